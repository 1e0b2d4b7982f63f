//! What makes two registrations one schema: the schema as Avro reads it,
//! not its JSON text. `"string"` and `{"type": "string"}`, a primitive with
//! a `name` (Avro ignores it), two key orders of one record, or a field
//! with the default `order` are one schema; docs, defaults, aliases and
//! every other property (`connect.name`, `logicalType`) stay part of it, as
//! in Avro Java's `Schema.toString()`, which Confluent's registry compares.
//!
//! Pure JSON: no parsing into Avro types, which would drop properties
//! Connect converters and Debezium rely on.

use serde_json::{Map, Value as Json};

const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// Keys Avro reserves: on a primitive they are not properties of it.
const RESERVED: [&str; 10] =
    ["type", "doc", "fields", "items", "name", "namespace", "size", "symbols", "values", "aliases"];

/// `schema` in the form identity compares, object keys sorted, compact.
pub fn identity_text(schema: &Json) -> String {
    sorted(&canonical(schema)).to_string()
}

/// Object keys sorted recursively, compact.
pub fn normalize(json: &Json) -> String {
    // serde_json keeps insertion order when some crate enables
    // `preserve_order`, so sort explicitly rather than rely on BTreeMap.
    sorted(json).to_string()
}

fn sorted(json: &Json) -> Json {
    match json {
        Json::Object(map) => {
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Json::Object(entries.into_iter().map(|(k, v)| (k.clone(), sorted(v))).collect())
        }
        Json::Array(items) => Json::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn canonical(schema: &Json) -> Json {
    match schema {
        Json::Array(branches) => Json::Array(branches.iter().map(canonical).collect()),
        Json::Object(map) => match map.get("type") {
            Some(Json::String(primitive)) if PRIMITIVES.contains(&primitive.as_str()) => {
                let properties: Map<String, Json> = map
                    .iter()
                    .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if properties.is_empty() {
                    Json::String(primitive.clone())
                } else {
                    let mut out = properties;
                    out.insert("type".into(), Json::String(primitive.clone()));
                    Json::Object(out)
                }
            }
            _ => Json::Object(
                map.iter()
                    .map(|(key, value)| {
                        let value = match key.as_str() {
                            "type" | "items" | "values" => canonical(value),
                            "fields" => match value {
                                Json::Array(fields) => Json::Array(fields.iter().map(field).collect()),
                                other => other.clone(),
                            },
                            _ => value.clone(),
                        };
                        (key.clone(), value)
                    })
                    .collect(),
            ),
        },
        other => other.clone(),
    }
}

/// A record field: its type canonical, the default `order` left out.
fn field(field: &Json) -> Json {
    let Json::Object(map) = field else { return field.clone() };
    Json::Object(
        map.iter()
            .filter(|(k, v)| !(k.as_str() == "order" && v.as_str() == Some("ascending")))
            .map(|(k, v)| (k.clone(), if k == "type" { canonical(v) } else { v.clone() }))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spellings_of_one_schema_have_one_identity() {
        let same = |a: Json, b: Json| assert_eq!(identity_text(&a), identity_text(&b), "{a} vs {b}");
        same(json!("string"), json!({"type": "string"}));
        same(json!("int"), json!({"type": "int", "name": "X"}));
        same(json!(["null", {"type": "string"}]), json!(["null", "string"]));
        same(
            json!({"type": "record", "name": "R", "fields": [{"name": "a", "type": {"type": "long"}, "order": "ascending"}]}),
            json!({"fields": [{"type": "long", "name": "a"}], "name": "R", "type": "record"}),
        );
        same(json!({"type": "array", "items": {"type": "int"}}), json!({"type": "array", "items": "int"}));
    }

    #[test]
    fn properties_stay_part_of_the_schema() {
        let differ = |a: Json, b: Json| assert_ne!(identity_text(&a), identity_text(&b), "{a} vs {b}");
        differ(json!("long"), json!({"type": "long", "connect.name": "org.apache.kafka.connect.data.Timestamp"}));
        differ(json!("int"), json!({"type": "int", "connect.type": "int8"}));
        differ(json!("long"), json!({"type": "long", "logicalType": "timestamp-millis"}));
        let field = |extra: Json| {
            let mut f = json!({"name": "a", "type": "int"});
            f.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
            json!({"type": "record", "name": "R", "fields": [f]})
        };
        differ(field(json!({})), field(json!({"default": 1})));
        differ(field(json!({})), field(json!({"doc": "why"})));
        differ(field(json!({})), field(json!({"order": "descending"})));
    }
}

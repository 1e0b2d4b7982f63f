//! The compatibility table: (old schema, new schema, whether the new one
//! reads the old one's data, whether the old one reads the new one's),
//! from the Avro specification's schema-resolution rules and Confluent's
//! documented behaviour (which runs Avro Java's `SchemaCompatibility`),
//! checked at every level. No services.

use apache_avro::Schema;
use kawka_registry::compat::{check, Level};
use kawka_registry::resolution::Parsed;

fn record(name: &str, fields: &str) -> String {
    format!(r#"{{"type":"record","name":"{name}","fields":[{fields}]}}"#)
}

fn r(fields: &str) -> String {
    record("R", fields)
}

fn field(name: &str, ty: &str) -> String {
    format!(r#"{{"name":"{name}","type":{ty}}}"#)
}

fn field_default(name: &str, ty: &str, default: &str) -> String {
    format!(r#"{{"name":"{name}","type":{ty},"default":{default}}}"#)
}

fn enumeration(name: &str, symbols: &[&str], default: Option<&str>) -> String {
    let symbols: Vec<String> = symbols.iter().map(|s| format!("\"{s}\"")).collect();
    let default = default.map(|d| format!(r#","default":"{d}""#)).unwrap_or_default();
    format!(r#"{{"type":"enum","name":"{name}","symbols":[{}]{default}}}"#, symbols.join(","))
}

fn q(primitive: &str) -> String {
    format!("\"{primitive}\"")
}

fn node(fields: &str) -> String {
    record("Node", &format!(r#"{{"name":"next","type":["null","Node"]}},{fields}"#))
}

/// (what, old, new, new reads old's data (BACKWARD), old reads new's (FORWARD)).
fn table() -> Vec<(&'static str, String, String, bool, bool)> {
    let int_a = r(&field("a", "\"int\""));
    let n = |fields: &str| record("N", fields);
    vec![
        // Primitives and promotions.
        ("int = int", q("int"), q("int"), true, true),
        ("int -> long", q("int"), q("long"), true, false),
        ("int -> float", q("int"), q("float"), true, false),
        ("int -> double", q("int"), q("double"), true, false),
        ("long -> float", q("long"), q("float"), true, false),
        ("long -> double", q("long"), q("double"), true, false),
        ("float -> double", q("float"), q("double"), true, false),
        ("long -> int", q("long"), q("int"), false, true),
        ("double -> float", q("double"), q("float"), false, true),
        ("string -> bytes", q("string"), q("bytes"), true, true),
        ("bytes -> string", q("bytes"), q("string"), true, true),
        ("string -> int", q("string"), q("int"), false, false),
        ("boolean -> int", q("boolean"), q("int"), false, false),
        ("null = null", q("null"), q("null"), true, true),
        ("null -> string", q("null"), q("string"), false, false),
        ("int -> string", q("int"), q("string"), false, false),
        ("float -> long", q("float"), q("long"), false, true),
        ("double -> long", q("double"), q("long"), false, true),
        ("boolean = boolean", q("boolean"), q("boolean"), true, true),
        ("int as {type:int}", q("int"), r#"{"type":"int"}"#.into(), true, true),
        // Unions.
        ("string -> [null,string]", q("string"), r#"["null","string"]"#.into(), true, false),
        ("[null,string] -> string", r#"["null","string"]"#.into(), q("string"), false, true),
        ("[string,int] -> [null,string]", r#"["string","int"]"#.into(), r#"["null","string"]"#.into(), false, false),
        (
            "[int,string] -> [int,string,null]",
            r#"["int","string"]"#.into(),
            r#"["int","string","null"]"#.into(),
            true,
            false,
        ),
        ("[int,string] -> [string,int]", r#"["int","string"]"#.into(), r#"["string","int"]"#.into(), true, true),
        ("[array,string] -> string", r#"[{"type":"array","items":"int"},"string"]"#.into(), q("string"), false, true),
        ("[int] -> long", r#"["int"]"#.into(), q("long"), true, false),
        ("int -> [null,long]", q("int"), r#"["null","long"]"#.into(), true, false),
        ("[null,int] -> [null,long]", r#"["null","int"]"#.into(), r#"["null","long"]"#.into(), true, false),
        ("[null,string] -> [null,bytes]", r#"["null","string"]"#.into(), r#"["null","bytes"]"#.into(), true, true),
        ("[null,int] -> [null,float,int]", r#"["null","int"]"#.into(), r#"["null","float","int"]"#.into(), true, false),
        ("[null,int] -> [null,string]", r#"["null","int"]"#.into(), r#"["null","string"]"#.into(), false, false),
        ("[int,long] -> [long]", r#"["int","long"]"#.into(), r#"["long"]"#.into(), true, true),
        // Records.
        ("record unchanged", int_a.clone(), int_a.clone(), true, true),
        (
            "field added with default",
            int_a.clone(),
            r(&format!("{},{}", field("a", "\"int\""), field_default("b", "\"int\"", "0"))),
            true,
            true,
        ),
        (
            "field added without default",
            int_a.clone(),
            r(&format!("{},{}", field("a", "\"int\""), field("b", "\"int\""))),
            false,
            true,
        ),
        (
            "field removed, it had no default",
            r(&format!("{},{}", field("a", "\"int\""), field("b", "\"int\""))),
            int_a.clone(),
            true,
            false,
        ),
        (
            "field removed, it had a default",
            r(&format!("{},{}", field("a", "\"int\""), field_default("b", "\"int\"", "0"))),
            int_a.clone(),
            true,
            true,
        ),
        ("field int -> long", int_a.clone(), r(&field("a", "\"long\"")), true, false),
        ("field long -> int", r(&field("a", "\"long\"")), int_a.clone(), false, true),
        ("field int -> string", int_a.clone(), r(&field("a", "\"string\"")), false, false),
        ("field renamed with an alias", int_a.clone(), r(r#"{"name":"b","type":"int","aliases":["a"]}"#), true, false),
        (
            "field renamed, the new one with a default",
            int_a.clone(),
            r(&field_default("b", "\"int\"", "1")),
            true,
            false,
        ),
        ("record renamed", int_a.clone(), record("S", &field("a", "\"int\"")), false, false),
        (
            "record renamed with an alias of the old name",
            int_a.clone(),
            r#"{"type":"record","name":"S","aliases":["R"],"fields":[{"name":"a","type":"int"}]}"#.into(),
            true,
            false,
        ),
        (
            "record moved to another namespace",
            r#"{"type":"record","name":"R","namespace":"one","fields":[{"name":"a","type":"int"}]}"#.into(),
            r#"{"type":"record","name":"R","namespace":"two","fields":[{"name":"a","type":"int"}]}"#.into(),
            true,
            true,
        ),
        ("optional field added", r(""), r(&field_default("a", r#"["null","string"]"#, "null")), true, true),
        ("optional field removed", r(&field_default("a", r#"["null","string"]"#, "null")), r(""), true, true),
        (
            "nested record gains a field without default",
            r(&field("n", &n(&field("x", "\"int\"")))),
            r(&field("n", &n(&format!("{},{}", field("x", "\"int\""), field("y", "\"int\""))))),
            false,
            true,
        ),
        (
            "nested record gains a field with default",
            r(&field("n", &n(&field("x", "\"int\"")))),
            r(&field("n", &n(&format!("{},{}", field("x", "\"int\""), field_default("y", "\"int\"", "0"))))),
            true,
            true,
        ),
        (
            "record in [null, record] gains a field without default",
            r(&field("u", &format!(r#"["null",{}]"#, n(&field("x", "\"int\""))))),
            r(&field(
                "u",
                &format!(r#"["null",{}]"#, n(&format!("{},{}", field("x", "\"int\""), field("y", "\"int\"")))),
            )),
            false,
            true,
        ),
        ("default added to a field", int_a.clone(), r(&field_default("a", "\"int\"", "0")), true, true),
        (
            "fields reordered",
            r(&format!("{},{}", field("a", "\"int\""), field("b", "\"string\""))),
            r(&format!("{},{}", field("b", "\"string\""), field("a", "\"int\""))),
            true,
            true,
        ),
        ("field int -> [null,int]", int_a.clone(), r(&field("a", r#"["null","int"]"#)), true, false),
        ("field [null,int] -> int", r(&field_default("a", r#"["null","int"]"#, "null")), int_a.clone(), false, true),
        ("field string -> bytes", r(&field("a", "\"string\"")), r(&field("a", "\"bytes\"")), true, true),
        (
            "field [string,int] -> [null,string]",
            r(&field("inner", r#"["string","int"]"#)),
            r(&field("inner", r#"["null","string"]"#)),
            false,
            false,
        ),
        ("record -> string", int_a.clone(), q("string"), false, false),
        // Enums.
        ("enum unchanged", enumeration("E", &["A", "B"], None), enumeration("E", &["A", "B"], None), true, true),
        (
            "enum symbol added",
            enumeration("E", &["A", "B"], None),
            enumeration("E", &["A", "B", "C"], None),
            true,
            false,
        ),
        (
            "enum symbol removed",
            enumeration("E", &["A", "B", "C"], None),
            enumeration("E", &["A", "B"], None),
            false,
            true,
        ),
        (
            "enum symbol added, new default",
            enumeration("E", &["A", "B"], None),
            enumeration("E", &["A", "B", "C"], Some("A")),
            true,
            false,
        ),
        (
            "enum symbol added, both with defaults",
            enumeration("E", &["A", "B"], Some("A")),
            enumeration("E", &["A", "B", "C"], Some("A")),
            true,
            true,
        ),
        (
            "enum symbol removed, both with defaults",
            enumeration("E", &["A", "B", "C"], Some("A")),
            enumeration("E", &["A", "B"], Some("A")),
            true,
            true,
        ),
        (
            "enum symbol removed, new default",
            enumeration("E", &["A", "B", "C"], None),
            enumeration("E", &["A", "B"], Some("A")),
            true,
            true,
        ),
        ("enum renamed", enumeration("E", &["A"], None), enumeration("F", &["A"], None), false, false),
        (
            "enum symbols reordered",
            enumeration("E", &["A", "B"], None),
            enumeration("E", &["B", "A"], None),
            true,
            true,
        ),
        ("enum -> string", enumeration("E", &["A"], None), q("string"), false, false),
        // Fixed.
        (
            "fixed unchanged",
            r#"{"type":"fixed","name":"F","size":4}"#.into(),
            r#"{"type":"fixed","name":"F","size":4}"#.into(),
            true,
            true,
        ),
        (
            "fixed resized",
            r#"{"type":"fixed","name":"F","size":4}"#.into(),
            r#"{"type":"fixed","name":"F","size":8}"#.into(),
            false,
            false,
        ),
        (
            "fixed renamed",
            r#"{"type":"fixed","name":"F","size":4}"#.into(),
            r#"{"type":"fixed","name":"G","size":4}"#.into(),
            false,
            false,
        ),
        ("fixed -> bytes", r#"{"type":"fixed","name":"F","size":4}"#.into(), q("bytes"), false, false),
        // Arrays and maps.
        (
            "array int -> long",
            r#"{"type":"array","items":"int"}"#.into(),
            r#"{"type":"array","items":"long"}"#.into(),
            true,
            false,
        ),
        (
            "array long -> int",
            r#"{"type":"array","items":"long"}"#.into(),
            r#"{"type":"array","items":"int"}"#.into(),
            false,
            true,
        ),
        (
            "array int -> string",
            r#"{"type":"array","items":"int"}"#.into(),
            r#"{"type":"array","items":"string"}"#.into(),
            false,
            false,
        ),
        (
            "map int -> long",
            r#"{"type":"map","values":"int"}"#.into(),
            r#"{"type":"map","values":"long"}"#.into(),
            true,
            false,
        ),
        (
            "map string -> bytes",
            r#"{"type":"map","values":"string"}"#.into(),
            r#"{"type":"map","values":"bytes"}"#.into(),
            true,
            true,
        ),
        (
            "array -> map",
            r#"{"type":"array","items":"int"}"#.into(),
            r#"{"type":"map","values":"int"}"#.into(),
            false,
            false,
        ),
        (
            "array of records gains a field with default",
            format!(r#"{{"type":"array","items":{}}}"#, int_a),
            format!(
                r#"{{"type":"array","items":{}}}"#,
                r(&format!("{},{}", field("a", "\"int\""), field_default("b", "\"int\"", "0")))
            ),
            true,
            true,
        ),
        (
            "array of records gains a field without default",
            format!(r#"{{"type":"array","items":{}}}"#, int_a),
            format!(
                r#"{{"type":"array","items":{}}}"#,
                r(&format!("{},{}", field("a", "\"int\""), field("b", "\"int\"")))
            ),
            false,
            true,
        ),
        (
            "map of unions gains a branch",
            r#"{"type":"map","values":["null","int"]}"#.into(),
            r#"{"type":"map","values":["null","int","string"]}"#.into(),
            true,
            false,
        ),
        // Logical types are read as their underlying types.
        ("date -> int", r#"{"type":"int","logicalType":"date"}"#.into(), q("int"), true, true),
        (
            "timestamp-millis -> long",
            r#"{"type":"long","logicalType":"timestamp-millis"}"#.into(),
            q("long"),
            true,
            true,
        ),
        (
            "timestamp-millis -> timestamp-micros",
            r#"{"type":"long","logicalType":"timestamp-millis"}"#.into(),
            r#"{"type":"long","logicalType":"timestamp-micros"}"#.into(),
            true,
            true,
        ),
        ("date -> long", r#"{"type":"int","logicalType":"date"}"#.into(), q("long"), true, false),
        (
            "decimal -> bytes",
            r#"{"type":"bytes","logicalType":"decimal","precision":4,"scale":2}"#.into(),
            q("bytes"),
            true,
            true,
        ),
        ("uuid -> string", r#"{"type":"string","logicalType":"uuid"}"#.into(), q("string"), true, true),
        ("date -> string", r#"{"type":"int","logicalType":"date"}"#.into(), q("string"), false, false),
        // Recursive records.
        ("recursive unchanged", node(&field("v", "\"int\"")), node(&field("v", "\"int\"")), true, true),
        ("recursive int -> long", node(&field("v", "\"int\"")), node(&field("v", "\"long\"")), true, false),
        (
            "recursive gains a field without default",
            node(&field("v", "\"int\"")),
            node(&format!("{},{}", field("v", "\"int\""), field("w", "\"int\""))),
            false,
            true,
        ),
        (
            "recursive gains a field with default",
            node(&field("v", "\"int\"")),
            node(&format!("{},{}", field("v", "\"int\""), field_default("w", "\"int\"", "0"))),
            true,
            true,
        ),
        // Unions of event types (one topic, several records).
        (
            "event type added to a union",
            format!("[{},{}]", record("A", &field("x", "\"int\"")), record("B", &field("y", "\"int\""))),
            format!(
                "[{},{},{}]",
                record("A", &field("x", "\"int\"")),
                record("B", &field("y", "\"int\"")),
                record("C", &field("z", "\"int\""))
            ),
            true,
            false,
        ),
        (
            "event type removed from a union",
            format!("[{},{}]", record("A", &field("x", "\"int\"")), record("B", &field("y", "\"int\""))),
            format!("[{}]", record("A", &field("x", "\"int\""))),
            false,
            true,
        ),
    ]
}

fn parse(what: &str, text: &str) -> Parsed {
    Schema::parse_str(text).unwrap_or_else(|e| panic!("{what}: {text}: {e}")).into()
}

#[test]
fn every_case_of_the_table_at_every_level() {
    let table = table();
    assert!(table.len() >= 80, "{} cases", table.len());
    let mut failures = Vec::new();
    for (what, old, new, backward, forward) in &table {
        let (old, new) = (parse(what, old), parse(what, new));
        let existing = std::slice::from_ref(&old);
        for level in Level::ALL {
            let expected = match level {
                Level::None => true,
                Level::Backward | Level::BackwardTransitive => *backward,
                Level::Forward | Level::ForwardTransitive => *forward,
                Level::Full | Level::FullTransitive => *backward && *forward,
            };
            let verdict = check(level, &new, existing);
            if verdict.is_ok() != expected {
                failures.push(format!("{what} at {level}: expected {expected}, got {verdict:?}"));
            }
            // Every refusal says why.
            if let Err(refusals) = &verdict {
                assert!(refusals.iter().all(|r| !r.found.is_empty()), "{what}: {refusals:?}");
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), table.len(), failures.join("\n"));
    eprintln!("{} compatibility cases x {} levels", table.len(), Level::ALL.len());
}

#[test]
fn transitive_levels_check_every_version_and_the_others_the_latest() {
    let v1 = parse("v1", &r(&field("a", "\"int\"")));
    // v2 adds b with a default, v3 drops b's default: v3 reads v2's data
    // but not v1's.
    let v2 = parse("v2", &r(&format!("{},{}", field("a", "\"int\""), field_default("b", "\"int\"", "0"))));
    let v3 = parse("v3", &r(&format!("{},{}", field("a", "\"int\""), field("b", "\"int\""))));
    let existing = [v1.clone(), v2.clone()];
    assert!(check(Level::Backward, &v3, &existing).is_ok());
    assert!(check(Level::BackwardTransitive, &v3, &existing).is_err());
    assert!(check(Level::Full, &v3, &existing).is_ok());
    assert!(check(Level::FullTransitive, &v3, &existing).is_err());
    // Forward: v1 (old) must read the new one's data; v2 is fine with any.
    let v4 = parse("v4", &r(&field("b", "\"int\"")));
    let existing = [v1, v2];
    assert!(check(Level::ForwardTransitive, &v4, &existing).is_err(), "v1 needs a, which v4 lacks");
    assert!(check(Level::Forward, &v4, &existing).is_err(), "v2 needs a too");
}

#[test]
fn refusals_name_the_type_of_incompatibility_and_where() {
    let old_text = r(&field("a", "\"int\""));
    let old = parse("old", &old_text);
    let new = parse("new", &r(&format!("{},{}", field("a", "\"int\""), field("age", "\"int\""))));
    let refusals = check(Level::Backward, &new, &[old]).expect_err("refused");
    let messages = kawka_registry::compat::messages(Level::Backward, &refusals, |_| (1, old_text.as_str()));
    assert_eq!(
        messages,
        [
            "{errorType:'READER_FIELD_MISSING_DEFAULT_VALUE', description:'The field 'age' at path '/fields/1' in the new \
             schema has no default value and is missing in the old schema', additionalInfo:'age'}"
                .to_string(),
            "{oldSchemaVersion: 1}".to_string(),
            format!("{{oldSchema: '{old_text}'}}"),
            "{validateFields: 'false', compatibility: 'BACKWARD'}".to_string(),
        ]
    );
    // FORWARD: the old schema is the reader, and the text says so.
    let old = parse("old", &r(&format!("{},{}", field("a", "\"int\""), field("b", "\"int\""))));
    let refusals = check(Level::Forward, &parse("new", &old_text), &[old]).expect_err("refused");
    let text = refusals[0].found[0].to_string();
    assert!(text.contains("in the old schema has no default value and is missing in the new schema"), "{text}");
    let old = parse("old", &enumeration("E", &["A", "B", "C"], None));
    let new = parse("new", &enumeration("E", &["A"], None));
    let refusals = check(Level::Backward, &new, &[old]).expect_err("refused");
    let text = refusals[0].found[0].to_string();
    assert!(text.contains("MISSING_ENUM_SYMBOLS") && text.contains("additionalInfo:'[B, C]'"), "{text}");
}

#[test]
fn references_resolve_on_both_sides() {
    let money = |field: &str| {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"Money","namespace":"shop","fields":[{{"name":"{field}","type":"long"}}]}}"#
        ))
        .expect("Money")
    };
    let with = |money: Schema| {
        let (schema, references) = Schema::parse_str_with_list(
            r#"{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"price","type":"shop.Money"}]}"#,
            [serde_json::to_string(&money).expect("json")],
        )
        .expect("parses");
        Parsed { schema, references }
    };
    let old = with(money("cents"));
    // The referenced type changed incompatibly (a field without default).
    let new = with(money("units"));
    assert!(check(Level::Backward, &new, std::slice::from_ref(&old)).is_err(), "the reference is compared");
    assert!(check(Level::Backward, &with(money("cents")), &[old]).is_ok());
}

#[test]
fn a_type_used_on_many_paths_is_checked_once() {
    // T0 {a: T1, b: T1}, T1 {a: T2, b: T2}, …: 2^40 paths, 40 types.
    let mut text = r#"{"type":"record","name":"T40","fields":[{"name":"x","type":"int"}]}"#.to_string();
    for n in (0..40).rev() {
        text = format!(
            r#"{{"type":"record","name":"T{n}","fields":[{{"name":"a","type":{text}}},{{"name":"b","type":"T{}"}}]}}"#,
            n + 1
        );
    }
    let schema = parse("deep", &text);
    let started = std::time::Instant::now();
    assert!(check(Level::Full, &schema, std::slice::from_ref(&schema)).is_ok());
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "memoized: {:?}", started.elapsed());
}

//! `kawka registry` against Confluent Schema Registry's documented API
//! (its API reference and `Errors.java`): schema identity by the parsed
//! schema, the compatibility endpoints, deletes, `/schemas`, `/mode`,
//! content negotiation, plain 404/405 answers and Confluent's error texts;
//! and Confluent's own Python client driving it. Compatibility verdicts
//! themselves are in `crates/kawka-registry/tests/compatibility_table.rs`;
//! here the issue's cases go through HTTP.

mod support;

use reqwest::Method;
use serde_json::{json, Value as Json};

use support::registry_api::{api, error_code, Api};

fn record(fields: Json) -> Json {
    json!({"type": "record", "name": "Order", "namespace": "shop", "fields": fields})
}

fn v1() -> Json {
    record(json!([{"name": "id", "type": "string"}]))
}

fn v2() -> Json {
    record(json!([{"name": "id", "type": "string"}, {"name": "total", "type": "long", "default": 0}]))
}

async fn set_level(api: &Api, subject: &str, level: &str) {
    let (status, body) = api.put(&format!("/config/{subject}"), json!({"compatibility": level})).await;
    assert_eq!(status, 200, "{body}");
}

async fn compatible(api: &Api, path: &str, schema: &Json) -> (u16, Json) {
    api.post(&format!("{path}?verbose=true"), json!({"schema": schema.to_string()})).await
}

#[tokio::test]
async fn one_schema_however_spelled_is_one_id_and_one_version() {
    let (api, registry) = api().await;
    let (status, first) = api.post("/subjects/plain/versions", json!({"schema": "\"string\""})).await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = api.post("/subjects/plain/versions", json!({"schema": "{\"type\": \"string\"}"})).await;
    assert_eq!(first["id"], second["id"], "\"string\" and {{\"type\":\"string\"}} are one schema");
    assert_eq!(api.get("/subjects/plain/versions").await, (200, json!([1])));
    // A primitive with a stray name is the primitive.
    api.post("/subjects/int/versions", json!({"schema": "\"int\""})).await;
    let (status, found) = api.post("/subjects/int", json!({"schema": "{\"type\":\"int\",\"name\":\"X\"}"})).await;
    assert_eq!((status, found["version"].clone()), (200, json!(1)), "{found}");
    // A record's key order and whitespace do not matter; a default does.
    let (_, a) = api.register("order", &v1()).await;
    let respelled = "{\"fields\":[{\"type\":\"string\",\"name\":\"id\"}],\n\"namespace\":\"shop\",\"name\":\"Order\",\"type\":\"record\"}";
    let (_, b) = api.post("/subjects/order/versions", json!({"schema": respelled})).await;
    assert_eq!(a["id"], b["id"]);
    let with_default = record(json!([{"name": "id", "type": "string", "default": "x"}]));
    let (_, c) = api.register("order", &with_default).await;
    assert_ne!(a["id"], c["id"], "a default is part of the schema");
    // Properties are part of the schema and kept as sent (Connect's types).
    let connect = json!({"type": "int", "connect.type": "int8"});
    let (_, d) = api.post("/subjects/tiny/versions", json!({"schema": connect.to_string()})).await;
    let (_, e) = api.post("/subjects/tiny/versions", json!({"schema": "\"int\""})).await;
    assert_ne!(d["id"], e["id"], "int8 is not int");
    assert_eq!(api.get(&format!("/schemas/ids/{}/schema", d["id"])).await, (200, connect));
    let _ = registry.stop().await;
}

#[tokio::test]
async fn the_issues_breaking_changes_are_refused() {
    let (api, registry) = api().await;
    let cases: [(&str, Json, Json); 5] = [
        (
            "BACKWARD",
            record(json!([{"name": "inner", "type": ["string", "int"]}])),
            record(json!([{"name": "inner", "type": ["null", "string"]}])),
        ),
        (
            "BACKWARD",
            record(json!([{"name": "inner", "type": [{"type": "array", "items": "int"}, "string"]}])),
            record(json!([{"name": "inner", "type": "string"}])),
        ),
        (
            "FORWARD",
            json!({"type": "enum", "name": "Color", "symbols": ["RED", "GREEN"]}),
            json!({"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}),
        ),
        (
            "BACKWARD",
            json!({"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}),
            json!({"type": "enum", "name": "Color", "symbols": ["RED", "GREEN"]}),
        ),
        (
            "FULL",
            record(
                json!([{"name": "u", "type": ["null", {"type": "record", "name": "N", "fields": [{"name": "x", "type": "int"}]}]}]),
            ),
            record(json!([{"name": "u", "type": ["null", {"type": "record", "name": "N", "fields": [
                {"name": "x", "type": "int"}, {"name": "y", "type": "int"}]}]}])),
        ),
    ];
    for (n, (level, old, new)) in cases.iter().enumerate() {
        let subject = format!("breaking{n}");
        set_level(&api, &subject, level).await;
        assert_eq!(api.register(&subject, old).await.0, 200);
        let (status, body) = api.register(&subject, new).await;
        assert_eq!((status, error_code(&body)), (409, 409), "{level} {new}: {body}");
        let (_, verdict) = compatible(&api, &format!("/compatibility/subjects/{subject}/versions/latest"), new).await;
        assert_eq!(verdict["is_compatible"], false, "{verdict}");
        assert!(verdict["messages"][0].as_str().is_some_and(|m| m.contains("errorType:'")), "{verdict}");
    }
    // An enum with a default takes new symbols both ways.
    set_level(&api, "colors", "FULL").await;
    api.register("colors", &json!({"type": "enum", "name": "Color", "symbols": ["RED"], "default": "RED"})).await;
    let (status, body) = api
        .register("colors", &json!({"type": "enum", "name": "Color", "symbols": ["RED", "BLUE"], "default": "RED"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let _ = registry.stop().await;
}

#[tokio::test]
async fn compatibility_endpoints_check_what_they_name() {
    let (api, registry) = api().await;
    set_level(&api, "orders", "BACKWARD_TRANSITIVE").await;
    api.register("orders", &v1()).await;
    api.register("orders", &v2()).await;
    // Reads v2's data but not v1's (total has no default, v1 lacks it).
    let reads_v2_only = record(json!([{"name": "id", "type": "string"}, {"name": "total", "type": "long"}]));
    let latest = compatible(&api, "/compatibility/subjects/orders/versions/latest", &reads_v2_only).await;
    assert_eq!(latest.1["is_compatible"], true, "latest names one version, even transitively: {}", latest.1);
    let first = compatible(&api, "/compatibility/subjects/orders/versions/1", &reads_v2_only).await;
    assert_eq!(first.1["is_compatible"], false, "{}", first.1);
    let all = compatible(&api, "/compatibility/subjects/orders/versions", &reads_v2_only).await;
    assert_eq!(all.1["is_compatible"], false, "no version: every version a transitive level reads: {}", all.1);
    set_level(&api, "orders", "BACKWARD").await;
    let all = compatible(&api, "/compatibility/subjects/orders/versions", &reads_v2_only).await;
    assert_eq!(all.1["is_compatible"], true, "no version, non-transitive: the latest: {}", all.1);
    // Nothing registered yet: nothing to break.
    let missing = compatible(&api, "/compatibility/subjects/nothing/versions/latest", &v1()).await;
    assert_eq!(missing, (200, json!({"is_compatible": true, "messages": []})));
    let (status, body) = compatible(&api, "/compatibility/subjects/orders/versions/7", &v1()).await;
    assert_eq!((status, error_code(&body), body["message"].clone()), (404, 40402, json!("Version 7 not found.")));
    // A numbered version of a missing subject: the version is not found
    // (Confluent's resource throws only that).
    let (status, body) = compatible(&api, "/compatibility/subjects/nothing/versions/3", &v1()).await;
    assert_eq!((status, error_code(&body)), (404, 40402), "{body}");
    let _ = registry.stop().await;
}

#[tokio::test]
async fn deletes_follow_confluent() {
    let (api, registry) = api().await;
    set_level(&api, "d", "NONE").await;
    for schema in [v1(), v2(), json!("string")] {
        api.register("d", &schema).await;
    }
    // `latest` is the latest live version: not soft-deleted, it cannot be
    // deleted for good.
    let (status, body) = api.delete("/subjects/d/versions/latest?permanent=true").await;
    assert_eq!((status, error_code(&body)), (404, 40407), "{body}");
    // Soft-delete the latest twice: 3, then 2 (the latest live one).
    assert_eq!(api.delete("/subjects/d/versions/latest").await, (200, json!(3)));
    assert_eq!(api.delete("/subjects/d/versions/latest").await, (200, json!(2)));
    assert_eq!(api.get("/subjects/d/versions").await, (200, json!([1])));
    assert_eq!(api.delete("/subjects/d/versions/1").await, (200, json!(1)));
    // Every version soft-deleted: the subject is not found.
    for path in ["/subjects/d/versions/latest", "/subjects/d/versions/1/schema", "/subjects/d/versions"] {
        let (status, body) = api.get(path).await;
        assert_eq!((status, error_code(&body)), (404, 40401), "{path}: {body}");
    }
    let (status, body) = api.get("/subjects/d/versions/2?deleted=true").await;
    assert_eq!(status, 200, "{body}");
    // A version another schema references cannot be deleted.
    api.register(
        "base",
        &json!({"type": "record", "name": "Money", "namespace": "shop", "fields": [
        {"name": "cents", "type": "long"}]}),
    )
    .await;
    let with_reference = json!({"schema": record(json!([{"name": "price", "type": "shop.Money"}])).to_string(),
        "references": [{"name": "shop.Money", "subject": "base", "version": 1}]});
    let (status, body) = api.post("/subjects/priced/versions", with_reference).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.delete("/subjects/base/versions/1").await;
    assert_eq!((status, error_code(&body)), (422, 42206), "{body}");
    let (status, body) = api.delete("/subjects/base").await;
    assert_eq!((status, error_code(&body)), (422, 42206), "{body}");
    // Once the referrer is gone, it can.
    api.delete("/subjects/priced").await;
    assert_eq!(api.delete("/subjects/base/versions/1").await, (200, json!(1)));
    let _ = registry.stop().await;
}

#[tokio::test]
async fn schemas_listing_mode_and_plain_errors() {
    let (api, registry) = api().await;
    set_level(&api, "a-value", "NONE").await;
    let (_, one) = api.register("a-value", &v1()).await;
    let id = one["id"].as_i64().expect("an id");
    api.register("a-value", &v2()).await;
    api.register("b-value", &json!("string")).await;
    let (status, all) = api.get("/schemas").await;
    assert_eq!(status, 200);
    let listed: Vec<(String, i64)> = all
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| (s["subject"].as_str().unwrap_or_default().to_string(), s["version"].as_i64().unwrap_or(0)))
        .collect();
    assert_eq!(listed, [("a-value".to_string(), 1), ("a-value".into(), 2), ("b-value".into(), 1)]);
    let (_, latest) = api.get("/schemas?subjectPrefix=a-&latestOnly=true").await;
    assert_eq!(latest.as_array().map(Vec::len), Some(1));
    assert_eq!(latest[0]["version"], 2);
    let (_, page) = api.get("/schemas?offset=1&limit=1").await;
    assert_eq!(page.as_array().map(Vec::len), Some(1));
    assert_eq!(page[0]["version"], 2);
    assert_eq!(api.get(&format!("/schemas/ids/{id}/subjects")).await, (200, json!(["a-value"])));
    assert_eq!(
        api.get(&format!("/schemas/ids/{id}/versions")).await,
        (200, json!([{"subject": "a-value", "version": 1}]))
    );
    // Modes: a read-only subject refuses registrations and deletes.
    assert_eq!(api.get("/mode").await, (200, json!({"mode": "READWRITE"})));
    let (status, body) = api.get("/mode/a-value").await;
    assert_eq!((status, error_code(&body)), (404, 40409), "{body}");
    assert_eq!(api.put("/mode/a-value", json!({"mode": "READONLY"})).await, (200, json!({"mode": "READONLY"})));
    let (status, body) = api.register("a-value", &json!("int")).await;
    assert_eq!((status, error_code(&body)), (422, 42205), "{body}");
    // A schema registered already answers its id (producers register on start).
    assert_eq!(api.register("a-value", &v1()).await, (200, json!({"id": id, "subject": "a-value", "version": 1})));
    let (status, body) = api.delete("/subjects/a-value/versions/1").await;
    assert_eq!((status, error_code(&body)), (422, 42205), "{body}");
    let (status, body) = api.put("/config/a-value", json!({"compatibility": "NONE"})).await;
    assert_eq!((status, error_code(&body)), (422, 42205), "{body}");
    let (status, body) = api.put("/mode/a-value", json!({"mode": "SIDEWAYS"})).await;
    assert_eq!((status, error_code(&body)), (422, 42204), "{body}");
    assert_eq!(api.delete("/mode/a-value").await, (200, json!({"mode": "READONLY"})));
    assert_eq!(api.register("a-value", &json!("int")).await.0, 200);
    // The registry as a whole.
    assert_eq!(api.put("/mode", json!({"mode": "READONLY"})).await.0, 200);
    let (status, body) = api.register("b-value", &json!("int")).await;
    assert_eq!((status, error_code(&body)), (422, 42205), "{body}");
    assert_eq!(api.get("/mode/b-value?defaultToGlobal=true").await, (200, json!({"mode": "READONLY"})));
    assert_eq!(api.put("/mode", json!({"mode": "READWRITE"})).await.0, 200);
    // Plain HTTP errors in Confluent's JSON.
    assert_eq!(api.get("/no/such/route").await, (404, json!({"error_code": 404, "message": "HTTP 404 Not Found"})));
    assert_eq!(
        api.get("/schemas/ids/not-a-number").await,
        (404, json!({"error_code": 404, "message": "HTTP 404 Not Found"}))
    );
    assert_eq!(
        api.call(Method::PATCH, "/subjects", None).await,
        (405, json!({"error_code": 405, "message": "HTTP 405 Method Not Allowed"}))
    );
    // Confluent's texts.
    let (_, body) = api.get("/schemas/ids/987654").await;
    assert_eq!(body, json!({"error_code": 40403, "message": "Schema 987654 not found"}));
    let (_, body) = api.get("/subjects/a-value/versions/99").await;
    assert_eq!(body, json!({"error_code": 40402, "message": "Version 99 not found."}));
    let (_, body) = api.get("/subjects/none/versions").await;
    assert_eq!(body, json!({"error_code": 40401, "message": "Subject 'none' not found."}));
    let (_, body) = api.put("/config/a-value", json!({"compatibility": "SIDEWAYS"})).await;
    assert_eq!(
        body,
        json!({"error_code": 42203, "message": "Invalid compatibility level. Valid values are none, backward, forward, full, backward_transitive, forward_transitive, and full_transitive"})
    );
    let (_, body) = api.post("/subjects/a-value/versions", json!({"schema": ""})).await;
    assert_eq!(body, json!({"error_code": 42201, "message": "Empty schema"}));
    let _ = registry.stop().await;
}

#[tokio::test]
async fn content_is_negotiated() {
    let (api, registry) = api().await;
    let url = format!("{}/subjects", api.base);
    let http = reqwest::Client::new();
    let answer = |accept: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http.get(&url).header("accept", accept).send().await.expect("answers");
            let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(String::from);
            (response.status().as_u16(), content_type)
        }
    };
    assert_eq!(answer("application/json").await, (200, Some("application/json".into())));
    assert_eq!(
        answer("application/json; q=0.5, application/vnd.schemaregistry+json").await,
        (200, Some("application/vnd.schemaregistry+json".into()))
    );
    assert_eq!(answer("*/*").await, (200, Some("application/vnd.schemaregistry.v1+json".into())));
    assert_eq!(answer("text/html").await.0, 406);
    let post = |content_type: &'static str, body: Vec<u8>| {
        let http = http.clone();
        let url = format!("{}/subjects/negotiated/versions", api.base);
        async move {
            let response =
                http.post(&url).header("content-type", content_type).body(body).send().await.expect("answers");
            let status = response.status().as_u16();
            (status, response.json::<Json>().await.unwrap_or(Json::Null))
        }
    };
    let schema =
        json!({"schema": "{\"type\":\"record\",\"name\":\"R\",\"doc\":\"CAF\u{c9}\",\"fields\":[]}"}).to_string();
    let (status, body) = post("text/plain", schema.clone().into_bytes()).await;
    assert_eq!((status, error_code(&body)), (415, 415), "{body}");
    let (status, body) = post("application/json; charset=utf-16", schema.clone().into_bytes()).await;
    assert_eq!(status, 415, "{body}");
    // Latin-1 is read as Latin-1: the É survives.
    let latin1: Vec<u8> = schema.chars().map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')).collect();
    let (status, body) = post("application/json; charset=ISO-8859-1", latin1).await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_i64().expect("an id");
    let (_, stored) = api.get(&format!("/schemas/ids/{id}/schema")).await;
    assert_eq!(stored["doc"], json!("CAF\u{c9}"));
    let _ = registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluents_python_client_gets_what_it_expects() {
    let registry = support::start_registry().await;
    let prefix = support::unique("py");
    let results = support::python_json("registry_client.py", vec![registry.url(), prefix.clone()]).await;
    let id1 = results["register_v1"].as_i64().expect("an id");
    let id2 = results["register_v2"].as_i64().expect("an id");
    assert_eq!(results["register_v1_again"], id1, "{results}");
    assert_ne!(id1, id2);
    assert_eq!(results["lookup_v1"], 1);
    assert_eq!(results["latest_version"], 2);
    assert_eq!(results["version_1_id"], id1);
    assert_eq!(results["versions"], json!([1, 2]));
    assert_eq!(results["schema_by_id_fields"], 2);
    let subject = format!("{prefix}-value");
    assert_eq!(results["subjects_by_id"], json!([subject]));
    assert_eq!(results["schema_versions_by_id"], json!([[subject, 1]]));
    assert_eq!(results["types"], json!(["AVRO"]));
    assert_eq!(results["compatible_v2"], true);
    assert_eq!(results["compatible_breaking"], false);
    assert_eq!(results["compatible_breaking_all"], false);
    assert_eq!(results["register_breaking"]["error_code"], 409, "{results}");
    assert_eq!(results["get_compatibility"], "FULL_TRANSITIVE");
    assert_eq!(results["set_bad_compatibility"]["error_code"], 42203);
    assert_eq!(results["get_mode"], "READONLY");
    assert_eq!(results["register_read_only"]["error_code"], 42205);
    assert_eq!(results["delete_mode"], "READONLY");
    assert_eq!(results["global_mode"], "READWRITE");
    assert_eq!(results["missing_subject"]["error_code"], 40401);
    assert_eq!(results["missing_version"]["error_code"], 40402);
    assert_eq!(results["missing_id"]["error_code"], 40403);
    assert_eq!(results["delete_version_2"], 2);
    assert_eq!(results["versions_after_delete"], json!([1]));
    assert_eq!(results["delete_subject"], json!([1]));
    assert_eq!(results["delete_subject_permanent"], json!([1, 2]));
    assert_eq!(results["subjects_after"], json!([]));
    eprintln!("{} calls of Confluent's Python client checked", results.as_object().map_or(0, |o| o.len()));
    let _ = registry.stop().await;
}

//! The `kawka registry` HTTP API against Confluent's contract: status codes,
//! error codes, idempotent ids, references, compatibility, deletes.

mod support;

use support::registry_api::{api, error_code};

use serde_json::{json, Value as Json};

fn user_v1() -> Json {
    json!({"type": "record", "name": "User", "namespace": "com.example", "fields": [
        {"name": "id", "type": "string"}]})
}

fn user_v2() -> Json {
    json!({"type": "record", "name": "User", "namespace": "com.example", "fields": [
        {"name": "id", "type": "string"},
        {"name": "country", "type": "string", "default": "unknown"}]})
}

/// Adds a field without a default: not backward compatible with v1/v2.
fn user_breaking() -> Json {
    json!({"type": "record", "name": "User", "namespace": "com.example", "fields": [
        {"name": "id", "type": "string"},
        {"name": "age", "type": "int"}]})
}

#[tokio::test]
async fn registration_is_idempotent_and_ids_are_global() {
    let (api, registry) = api().await;
    let (status, first) = api.register("users-value", &user_v1()).await;
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_i64().expect("id");

    // The same schema spelled differently: same id, same version.
    let respelled =
        r#"{"namespace":"com.example","fields":[{"type":"string","name":"id"}],"name":"User","type":"record"}"#;
    let (status, again) = api.post("/subjects/users-value/versions", json!({"schema": respelled})).await;
    assert_eq!((status, again["id"].as_i64(), again["version"].as_i64()), (200, Some(id), Some(1)));
    // Under another subject: the same global id, version 1 there.
    let (_, other) = api.register("people-value", &user_v1()).await;
    assert_eq!(other["id"].as_i64(), Some(id));

    let (_, second) = api.register("users-value", &user_v2()).await;
    let id2 = second["id"].as_i64().expect("id");
    assert_ne!(id2, id);
    assert_eq!(api.get("/subjects").await, (200, json!(["people-value", "users-value"])));
    assert_eq!(api.get("/subjects/users-value/versions").await, (200, json!([1, 2])));

    let (status, latest) = api.get("/subjects/users-value/versions/latest").await;
    assert_eq!(status, 200);
    assert_eq!(
        (latest["subject"].as_str(), latest["version"].as_i64(), latest["id"].as_i64()),
        (Some("users-value"), Some(2), Some(id2))
    );
    let parsed: Json = serde_json::from_str(latest["schema"].as_str().expect("schema text")).expect("schema is JSON");
    assert_eq!(parsed["fields"][1]["default"], json!("unknown"));
    assert_eq!(api.get("/subjects/users-value/versions/1/schema").await, (200, user_v1()));

    let (status, by_id) = api.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Json>(by_id["schema"].as_str().unwrap()).unwrap(), user_v1());
    assert_eq!(
        api.get(&format!("/schemas/ids/{id}/versions")).await,
        (200, json!([{"subject": "people-value", "version": 1}, {"subject": "users-value", "version": 1}]))
    );
    assert_eq!(api.get(&format!("/schemas/ids/{id}/subjects")).await, (200, json!(["people-value", "users-value"])));

    // Lookup of a registered schema under a subject.
    let (status, found) = api.post("/subjects/users-value", json!({"schema": user_v1().to_string()})).await;
    assert_eq!((status, found["id"].as_i64(), found["version"].as_i64()), (200, Some(id), Some(1)));
    registry.stop().await.expect("registry stops");
}

#[tokio::test]
async fn concurrent_registrations_of_one_schema_get_one_id() {
    let (api, registry) = api().await;
    let api = std::sync::Arc::new(api);
    let schema = json!({"type": "record", "name": "Order", "fields": [{"name": "n", "type": "long"}]});
    let mut tasks = Vec::new();
    for task in 0..12 {
        let (api, schema) = (api.clone(), schema.clone());
        // Half on one subject, half spread over others: the id is global.
        let subject = if task % 2 == 0 { "orders-value".to_string() } else { format!("orders-{task}-value") };
        tasks.push(tokio::spawn(async move { api.register(&subject, &schema).await }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let (status, body) = task.await.expect("task");
        assert_eq!(status, 200, "{body}");
        ids.insert(body["id"].as_i64().expect("id"));
    }
    assert_eq!(ids.len(), 1, "one id for one schema: {ids:?}");
    assert_eq!(api.get("/subjects/orders-value/versions").await, (200, json!([1])));
    registry.stop().await.expect("registry stops");
}

#[tokio::test]
async fn errors_carry_confluent_codes() {
    let (api, registry) = api().await;
    api.register("users-value", &user_v1()).await;

    let (status, body) = api.get("/subjects/missing-value/versions").await;
    assert_eq!((status, error_code(&body)), (404, 40401));
    let (status, body) = api.get("/subjects/users-value/versions/7").await;
    assert_eq!((status, error_code(&body)), (404, 40402));
    let (status, body) = api.get("/schemas/ids/987654").await;
    assert_eq!((status, error_code(&body)), (404, 40403));
    let (status, body) = api.get("/subjects/users-value/versions/first").await;
    assert_eq!((status, error_code(&body)), (422, 42202));
    let (status, body) = api.get("/subjects/users-value/versions/0").await;
    assert_eq!((status, error_code(&body)), (422, 42202));
    let (status, body) = api.post("/subjects/users-value/versions", json!({"schema": "{\"type\": \"record\"}"})).await;
    assert_eq!((status, error_code(&body)), (422, 42201));
    let (status, body) = api.post("/subjects/users-value/versions", json!({"schema": "not json"})).await;
    assert_eq!((status, error_code(&body)), (422, 42201));
    let (status, body) =
        api.post("/subjects/users-value/versions", json!({"schema": "{}", "schemaType": "PROTOBUF"})).await;
    assert_eq!((status, error_code(&body)), (422, 42201));
    let (status, body) = api.put("/config", json!({"compatibility": "SIDEWAYS"})).await;
    assert_eq!((status, error_code(&body)), (422, 42203));

    // Lookups: unknown subject, unknown schema.
    let (status, body) = api.post("/subjects/missing-value", json!({"schema": user_v1().to_string()})).await;
    assert_eq!((status, error_code(&body)), (404, 40401));
    let (status, body) = api.post("/subjects/users-value", json!({"schema": user_v2().to_string()})).await;
    assert_eq!((status, error_code(&body)), (404, 40403));
    registry.stop().await.expect("registry stops");
}

#[tokio::test]
async fn compatibility_levels_and_config() {
    let (api, registry) = api().await;
    assert_eq!(api.get("/config").await, (200, json!({"compatibilityLevel": "BACKWARD"})));
    api.register("users-value", &user_v1()).await;

    // BACKWARD (the default) refuses a new field without default.
    let (status, body) = api.register("users-value", &user_breaking()).await;
    assert_eq!((status, error_code(&body)), (409, 409), "{body}");
    let (status, body) = api
        .post(
            "/compatibility/subjects/users-value/versions/latest?verbose=true",
            json!({"schema": user_breaking().to_string()}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["is_compatible"], json!(false));
    assert!(!body["messages"].as_array().expect("messages").is_empty());
    let (_, body) =
        api.post("/compatibility/subjects/users-value/versions/1", json!({"schema": user_v2().to_string()})).await;
    assert_eq!(body, json!({"is_compatible": true}));
    // Nothing registered under the subject: nothing to break (Confluent).
    let (status, body) = api
        .post("/compatibility/subjects/missing-value/versions/latest", json!({"schema": user_v2().to_string()}))
        .await;
    assert_eq!((status, body), (200, json!({"is_compatible": true})));

    // A subject level wins over the global one; NONE accepts anything.
    let (status, body) = api.get("/config/users-value").await;
    assert_eq!((status, error_code(&body)), (404, 40408));
    assert_eq!(
        api.get("/config/users-value?defaultToGlobal=true").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    assert_eq!(
        api.put("/config/users-value", json!({"compatibility": "NONE"})).await,
        (200, json!({"compatibility": "NONE"}))
    );
    assert_eq!(api.get("/config/users-value").await, (200, json!({"compatibilityLevel": "NONE"})));
    let (status, _) = api.register("users-value", &user_breaking()).await;
    assert_eq!(status, 200);
    assert_eq!(api.delete("/config/users-value").await, (200, json!({"compatibilityLevel": "NONE"})));

    // FULL_TRANSITIVE checks every version: v2 (default added) is fine
    // against v1 but not against the breaking version 2.
    assert_eq!(
        api.put("/config", json!({"compatibility": "FULL_TRANSITIVE"})).await,
        (200, json!({"compatibility": "FULL_TRANSITIVE"}))
    );
    let (status, body) = api.register("users-value", &user_v2()).await;
    assert_eq!((status, error_code(&body)), (409, 409), "{body}");
    let (status, _) = api.register("fresh-value", &user_v1()).await;
    assert_eq!(status, 200);
    let (status, body) = api.register("fresh-value", &user_v2()).await;
    assert_eq!(status, 200, "{body}");
    registry.stop().await.expect("registry stops");
}

#[tokio::test]
async fn references_resolve_and_are_reported() {
    let (api, registry) = api().await;
    let address = json!({"type": "record", "name": "Address", "namespace": "com.example", "fields": [
        {"name": "city", "type": "string"}]});
    let (_, body) = api.register("address", &address).await;
    let address_id = body["id"].as_i64().expect("id");
    let user = json!({"type": "record", "name": "Customer", "namespace": "com.example", "fields": [
        {"name": "home", "type": "com.example.Address"}]});
    let references = json!([{"name": "com.example.Address", "subject": "address", "version": 1}]);

    // Without the reference the schema does not parse.
    let (status, body) = api.register("customers-value", &user).await;
    assert_eq!((status, error_code(&body)), (422, 42201));
    let (status, body) = api
        .post("/subjects/customers-value/versions", json!({"schema": user.to_string(), "references": references}))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_i64().expect("id");
    assert_ne!(id, address_id);
    let (_, by_id) = api.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(by_id["references"], references);
    assert_eq!(api.get("/subjects/address/versions/1/referencedby").await, (200, json!([id])));

    // A reference to a version that does not exist.
    let dangling = json!([{"name": "com.example.Address", "subject": "address", "version": 9}]);
    let (status, body) =
        api.post("/subjects/other-value/versions", json!({"schema": user.to_string(), "references": dangling})).await;
    assert_eq!((status, error_code(&body)), (422, 42201));

    // kawka's own client resolves the references and decodes.
    let client =
        kawka::codec::registry::RegistryClient::new(&kawka::codec::RegistryClientSettings::plain(registry.url()))
            .expect("client");
    let writer = client.writer_schema(id as u32).await.expect("writer schema");
    let (name, value) = writer.decoder.decode(&[0x06, b'R', b'i', b'o']).expect("decodes");
    assert_eq!(name, "com.example.Customer");
    assert_eq!(value.to_json(), json!({"home": {"city": "Rio"}}));
    registry.stop().await.expect("registry stops");
}

#[tokio::test]
async fn soft_and_permanent_deletes() {
    let (api, registry) = api().await;
    let (_, body) = api.register("users-value", &user_v1()).await;
    let id = body["id"].as_i64().expect("id");
    api.register("users-value", &user_v2()).await;

    // A version: soft, then permanent; twice soft is an error; permanent
    // needs soft first.
    let (status, body) = api.delete("/subjects/users-value/versions/2?permanent=true").await;
    assert_eq!((status, error_code(&body)), (404, 40407));
    assert_eq!(api.delete("/subjects/users-value/versions/2").await, (200, json!(2)));
    let (status, body) = api.delete("/subjects/users-value/versions/2").await;
    assert_eq!((status, error_code(&body)), (404, 40406));
    let (status, body) = api.get("/subjects/users-value/versions/2").await;
    assert_eq!((status, error_code(&body)), (404, 40402));
    let (status, body) = api.get("/subjects/users-value/versions/2?deleted=true").await;
    assert_eq!((status, body["version"].as_i64()), (200, Some(2)));
    assert_eq!(api.get("/subjects/users-value/versions").await, (200, json!([1])));
    assert_eq!(api.get("/subjects/users-value/versions?deleted=true").await, (200, json!([1, 2])));
    assert_eq!(api.delete("/subjects/users-value/versions/2?permanent=true").await, (200, json!(2)));
    assert_eq!(api.get("/subjects/users-value/versions?deleted=true").await, (200, json!([1])));

    // The subject: same rules.
    let (status, body) = api.delete("/subjects/users-value?permanent=true").await;
    assert_eq!((status, error_code(&body)), (404, 40405));
    assert_eq!(api.delete("/subjects/users-value").await, (200, json!([1])));
    let (status, body) = api.delete("/subjects/users-value").await;
    assert_eq!((status, error_code(&body)), (404, 40404));
    assert_eq!(api.get("/subjects").await, (200, json!([])));
    assert_eq!(api.get("/subjects?deleted=true").await, (200, json!(["users-value"])));
    assert_eq!(api.delete("/subjects/users-value?permanent=true").await, (200, json!([1])));
    let (status, body) = api.get("/subjects/users-value/versions").await;
    assert_eq!((status, error_code(&body)), (404, 40401));

    // Ids are stable: events written with this id still decode.
    let (status, _) = api.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(status, 200);
    // Registering it again gives the same id.
    let (_, body) = api.register("users-value", &user_v1()).await;
    assert_eq!(body["id"].as_i64(), Some(id));
    registry.stop().await.expect("registry stops");
}

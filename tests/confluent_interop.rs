//! Interoperability with the real Confluent client: `SchemaRegistryClient`
//! and `AvroSerializer` (Python) register v1 and v2 of a schema in `kawka
//! registry` and produce to the broker; kawka's codec decodes those bytes by
//! fetching each writer schema by id, and rejects bad frames without panics.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use kawka::codec::framing::FramingError;
use kawka::codec::registry::RegistryClient;
use kawka::codec::{Codec, CodecError, Decoded};
use kawka::codec::{KeyFormat, RegistryClientSettings};
use kawka::event::Position;
use kawka::source::{KeyBytes, RawRecord};
use kawka::value::intern;

#[tokio::test]
async fn confluent_python_producer_to_kawka_decoder() {
    let registry = support::start_registry().await;
    let topic = support::unique("interop");
    support::create_topic(&topic, 1).await;

    let v1 = json!({"type": "record", "name": "UserRegistered", "namespace": "com.example.users", "fields": [
        {"name": "id", "type": "string"},
        {"name": "fullName", "type": "string"}]});
    let v2 = json!({"type": "record", "name": "UserRegistered", "namespace": "com.example.users", "fields": [
        {"name": "id", "type": "string"},
        {"name": "name", "type": "string", "default": ""},
        {"name": "country", "type": "string", "default": "unknown"},
        {"name": "age", "type": ["null", "int"], "default": null}]});
    let spec = json!({
        "bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic", "schemas": {"v1": v1, "v2": v2},
    });
    let records = vec![
        json!({"schema": "v1", "key": "u1", "value": {"id": "u1", "fullName": "Ada Lovelace"}}),
        json!({"schema": "v2", "key": "u2", "value": {"id": "u2", "name": "Alan", "country": "UK", "age": 41}}),
        json!({"schema": "v1", "key": "u3", "value": {"id": "u3", "fullName": "Grace Hopper"}}),
        json!({"schema": "v2", "key": "u4", "value": {"id": "u4", "name": "Łucja", "country": "PL", "age": null}}),
        // Bad frames, sent as raw bytes.
        json!({"key": "bad1", "raw_value_hex": ""}),
        json!({"key": "bad2", "raw_value_hex": "7b7d"}),
        json!({"key": "bad3", "raw_value_hex": "000000"}),
        // A tombstone.
        json!({"key": "u3", "value": null}),
    ];
    let produced = support::produce_with_python(&spec, records).await;
    assert_eq!(produced.produced, 8);
    let (v1_id, v2_id) = (produced.ids["v1"], produced.ids["v2"]);
    assert_ne!(v1_id, v2_id, "two versions, two ids");

    // The registry holds both versions under the topic's subject.
    let client = Arc::new(RegistryClient::new(&RegistryClientSettings::plain(registry.url())).expect("client"));
    assert_eq!(client.subject_versions(&format!("{topic}-value")).await.expect("versions"), vec![1, 2]);

    let consumed = support::consume(&topic, 8, Duration::from_secs(30)).await;
    assert_eq!(consumed.len(), 8, "all records arrive");
    let codec = Codec::new(client.clone(), KeyFormat::String);
    let mut decoded = Vec::new();
    for record in &consumed {
        let raw = RawRecord {
            position: Position { topic: intern(&topic), partition: record.partition, offset: record.offset },
            timestamp: None,
            key: record.key.as_deref().map(KeyBytes::from_slice),
            value: record.value.clone().map(Into::into),
            headers: Vec::new(),
        };
        decoded.push(codec.decode(&raw).await);
    }

    let event = |index: usize| match &decoded[index] {
        Ok(Decoded::Event { event, .. }) => event.clone(),
        other => panic!("record {index}: expected an event, got {other:?}"),
    };
    let first = event(0);
    assert_eq!(first.event_type, "com.example.users.UserRegistered");
    assert_eq!(first.key.as_str(), Some("u1"));
    assert_eq!(first.payload.to_json(), json!({"id": "u1", "fullName": "Ada Lovelace"}));
    assert_eq!(event(1).payload.to_json(), json!({"id": "u2", "name": "Alan", "country": "UK", "age": 41}));
    assert_eq!(event(2).payload.to_json(), json!({"id": "u3", "fullName": "Grace Hopper"}));
    assert_eq!(event(3).payload.to_json(), json!({"id": "u4", "name": "Łucja", "country": "PL", "age": null}));

    // Each writer schema was fetched once, by id, and cached.
    assert_eq!(client.cached(v1_id).expect("v1 cached").id, v1_id);
    assert_eq!(client.cached(v2_id).expect("v2 cached").id, v2_id);

    // Bad frames are errors of their record, not panics. (An empty value
    // arrives as a null payload from librdkafka, i.e. a tombstone.)
    assert!(
        matches!(decoded[4], Ok(Decoded::Tombstone { .. }) | Err(CodecError::Framing(FramingError::Empty))),
        "{:?}",
        decoded[4]
    );
    assert!(matches!(decoded[5], Err(CodecError::Framing(FramingError::WrongMagic(b'{')))), "{:?}", decoded[5]);
    assert!(matches!(decoded[6], Err(CodecError::Framing(FramingError::TooShort(3)))), "{:?}", decoded[6]);
    match &decoded[7] {
        Ok(Decoded::Tombstone { key }) => assert_eq!(key.as_str(), Some("u3")),
        other => panic!("expected a tombstone, got {other:?}"),
    }

    // An id the registry does not have is a definite, permanent error.
    let mut unknown = vec![0, 0x7f, 0xff, 0xff, 0xff];
    unknown.push(0);
    let raw = RawRecord {
        position: Position { topic: intern(&topic), partition: 0, offset: 99 },
        timestamp: None,
        key: None,
        value: Some(unknown.into()),
        headers: Vec::new(),
    };
    let error = codec.decode(&raw).await.expect_err("unknown id");
    assert_eq!(error.class(), kawka::error::ErrorClass::Permanent, "{error}");
    registry.stop().await.expect("registry stops");
}

#[tokio::test]
async fn an_unreachable_registry_is_transient() {
    // Nothing listens on port 9 of this machine.
    let client = RegistryClient::new(&RegistryClientSettings::plain("http://127.0.0.1:9")).expect("client");
    let error = client.writer_schema(1).await.expect_err("no registry");
    assert_eq!(error.class(), kawka::error::ErrorClass::Transient, "{error}");
}

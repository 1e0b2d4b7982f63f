"""Drives a schema registry with Confluent's own Python client
(`SchemaRegistryClient`), for kawka's conformance tests.

argv[1]: the registry URL; argv[2]: a subject prefix of the test's own.
Prints one JSON object: each call's result, or {"error_code": N} when the
client raised (the code the server answered).
"""
import json
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

V1 = {"type": "record", "name": "Order", "namespace": "shop", "fields": [{"name": "id", "type": "string"}]}
V2 = {"type": "record", "name": "Order", "namespace": "shop",
      "fields": [{"name": "id", "type": "string"}, {"name": "total", "type": "long", "default": 0}]}
BREAKING = {"type": "record", "name": "Order", "namespace": "shop",
            "fields": [{"name": "id", "type": "string"}, {"name": "customer", "type": "string"}]}


def schema(definition):
    return Schema(json.dumps(definition), "AVRO")


def main():
    url, prefix = sys.argv[1], sys.argv[2]
    client = SchemaRegistryClient({"url": url})
    subject = f"{prefix}-value"
    results = {}

    def record(name, call):
        try:
            results[name] = call()
        except SchemaRegistryError as error:
            results[name] = {"error_code": error.error_code, "http_status": error.http_status_code}

    record("register_v1", lambda: client.register_schema(subject, schema(V1)))
    # The same schema spelled otherwise: one id.
    spaced = Schema(json.dumps(V1, indent=2, sort_keys=True), "AVRO")
    record("register_v1_again", lambda: client.register_schema(subject, spaced))
    record("register_v2", lambda: client.register_schema(subject, schema(V2)))
    record("lookup_v1", lambda: client.lookup_schema(subject, schema(V1)).version)
    record("latest_version", lambda: client.get_latest_version(subject).version)
    record("version_1_id", lambda: client.get_version(subject, 1).schema_id)
    record("versions", lambda: client.get_versions(subject))
    record("schema_by_id_fields", lambda: len(json.loads(client.get_schema(results["register_v2"]).schema_str)["fields"]))
    record("subjects_by_id", lambda: client.get_subjects_by_schema_id(results["register_v1"]))
    record("schema_versions_by_id", lambda: [(v.subject, v.version) for v in client.get_schema_versions(results["register_v1"])])
    record("types", lambda: client.get_schema_types())
    record("compatible_v2", lambda: client.test_compatibility(subject, schema(V2)))
    record("compatible_breaking", lambda: client.test_compatibility(subject, schema(BREAKING)))
    record("compatible_breaking_all", lambda: client.test_compatibility_all_versions(subject, schema(BREAKING)))
    record("register_breaking", lambda: client.register_schema(subject, schema(BREAKING)))
    record("set_compatibility", lambda: client.set_compatibility(subject, "FULL_TRANSITIVE"))
    record("get_compatibility", lambda: client.get_compatibility(subject))
    record("set_bad_compatibility", lambda: client.set_compatibility(subject, "SIDEWAYS"))
    record("update_mode", lambda: client.update_mode(subject, "READONLY"))
    record("get_mode", lambda: client.get_mode(subject))
    # A schema the client has not cached (it answers cached ones itself).
    v3 = dict(V2, fields=V2["fields"] + [{"name": "note", "type": "string", "default": ""}])
    record("register_read_only", lambda: client.register_schema(subject, schema(v3)))
    record("delete_mode", lambda: client.delete_mode(subject))
    record("global_mode", lambda: client.get_global_mode())
    record("missing_subject", lambda: client.get_latest_version(f"{prefix}-missing"))
    record("missing_version", lambda: client.get_version(subject, 9))
    record("missing_id", lambda: client.get_schema(987654321))
    record("delete_version_2", lambda: client.delete_version(subject, 2))
    record("versions_after_delete", lambda: client.get_versions(subject))
    record("delete_subject", lambda: client.delete_subject(subject))
    record("delete_subject_permanent", lambda: client.delete_subject(subject, permanent=True))
    record("subjects_after", lambda: [s for s in client.get_subjects() if s.startswith(prefix)])
    print(json.dumps(results))


if __name__ == "__main__":
    main()

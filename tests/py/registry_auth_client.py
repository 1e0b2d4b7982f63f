"""Talks to a registry that requires credentials, with Confluent's own Python
client (`basic.auth.user.info`, and `ssl.ca.location` over https), for
kawka's security tests.

argv[1]: the registry URL; argv[2]: a subject prefix of the test's own;
argv[3]: "user:password" of a user who may write; argv[4]: "user:password"
of a user who may only read; argv[5] (optional): the CA file of an https URL.
Prints one JSON object: each call's result, or {"error_code", "http_status"}
when the client raised.
"""
import json
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

ORDER = {"type": "record", "name": "Order", "namespace": "shop", "fields": [{"name": "id", "type": "string"}]}


def client(url, user_info, ca):
    conf = {"url": url}
    if user_info is not None:
        conf["basic.auth.user.info"] = user_info
    if ca:
        conf["ssl.ca.location"] = ca
    return SchemaRegistryClient(conf)


def main():
    url, prefix, writer, reader = sys.argv[1:5]
    ca = sys.argv[5] if len(sys.argv) > 5 else None
    subject = f"{prefix}-value"
    results = {}

    def record(name, call):
        try:
            results[name] = call()
        except SchemaRegistryError as error:
            results[name] = {"error_code": error.error_code, "http_status": error.http_status_code}

    schema = Schema(json.dumps(ORDER), "AVRO")
    record("register", lambda: client(url, writer, ca).register_schema(subject, schema))
    record("read_by_reader", lambda: client(url, reader, ca).get_latest_version(subject).schema_id)
    record("register_by_reader", lambda: client(url, reader, ca).register_schema(f"{prefix}-other-value", schema))
    user = writer.split(":", 1)[0]
    record("wrong_password", lambda: client(url, f"{user}:not-the-password", ca).get_subjects())
    record("anonymous", lambda: client(url, None, ca).get_subjects())
    print(json.dumps(results))


if __name__ == "__main__":
    main()

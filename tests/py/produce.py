"""Produces Avro events with the real Confluent client, for kawka's tests and demo.

stdin: a JSON spec on the first line, then one JSON record per line:
  spec:   {"bootstrap": "127.0.0.1:9092", "registry": "http://127.0.0.1:8081",
           "registry_user_info": "user:password"? (basic auth),
           "topic": "users", "subject_strategy": "topic" | "record" | "topic_record",
           "schemas": {"<name>": <Avro schema (JSON)>}}
  record: {"schema": "<name>", "key": "k" | null, "value": {...} | null, "partition": 0?,
           "raw_value_hex": "..."? (bytes sent as they are, no serializer),
           "schema_id": N? (framed with this id by hand: no registry call)}
Each schema is registered by AvroSerializer (auto.register.schemas) under the
subject of the strategy. Prints {"produced": N, "ids": {"<name>": id}} on stdout.
"""
import io
import json
import struct
import sys

import fastavro

from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from confluent_kafka.schema_registry import (
    record_subject_name_strategy,
    topic_record_subject_name_strategy,
    topic_subject_name_strategy,
)

STRATEGIES = {
    "topic": topic_subject_name_strategy,
    "record": record_subject_name_strategy,
    "topic_record": topic_record_subject_name_strategy,
}


def main():
    spec = json.loads(sys.stdin.readline())
    registry_conf = {"url": spec["registry"]}
    if spec.get("registry_user_info"):
        registry_conf["basic.auth.user.info"] = spec["registry_user_info"]
    registry = SchemaRegistryClient(registry_conf)
    strategy = STRATEGIES[spec.get("subject_strategy", "topic")]
    serializers = {
        name: AvroSerializer(
            registry,
            json.dumps(schema),
            conf={"auto.register.schemas": True, "subject.name.strategy": strategy},
        )
        for name, schema in spec["schemas"].items()
    }
    producer = Producer({
        "bootstrap.servers": spec["bootstrap"],
        "enable.idempotence": True,
        "linger.ms": 20,
        # Tests produce records up to a few MB (kawka's limits are tested, not the client's).
        "message.max.bytes": 16000000,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000,
    })
    topic = spec["topic"]
    context = SerializationContext(topic, MessageField.VALUE)
    failures = []

    def delivered(error, _message):
        if error is not None:
            failures.append(str(error))

    produced = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        record = json.loads(line)
        if "raw_value_hex" in record:
            value = bytes.fromhex(record["raw_value_hex"])
        elif "schema_id" in record:
            # Framed by hand with a given id: no registry needed (it may be down).
            body = io.BytesIO()
            fastavro.schemaless_writer(body, fastavro.parse_schema(spec["schemas"][record["schema"]]), record["value"])
            value = b"\x00" + struct.pack(">I", record["schema_id"]) + body.getvalue()
        elif record.get("value") is None:
            value = None
        else:
            value = serializers[record["schema"]](record["value"], context)
        key = record.get("key")
        if isinstance(key, str):
            key = key.encode()
        elif "raw_key_hex" in record:
            key = bytes.fromhex(record["raw_key_hex"])
        kwargs = {"key": key, "value": value, "on_delivery": delivered}
        if record.get("partition") is not None:
            kwargs["partition"] = record["partition"]
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        produced += 1
        if produced % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(60)
    if remaining or failures:
        print(f"delivery failed: {remaining} undelivered, errors: {failures[:5]}", file=sys.stderr)
        sys.exit(1)
    ids = {}
    for name, schema in spec["schemas"].items():
        full_name = f"{schema['namespace']}.{schema['name']}" if schema.get("namespace") else schema["name"]
        subject = strategy(context, full_name)
        try:
            ids[name] = registry.lookup_schema(subject, Schema(json.dumps(schema), "AVRO")).schema_id
        except Exception:  # a schema never used was never registered
            pass
    print(json.dumps({"produced": produced, "ids": ids}))


if __name__ == "__main__":
    main()

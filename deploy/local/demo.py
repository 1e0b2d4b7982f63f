"""The demo's events and checks, with the real Confluent client.

  demo.py produce   produce the retail and profile events (only into empty
                    topics: a second run shows the same read models); prints
                    "fresh" when it produced into empty topics
  demo.py expect    print the expected inventory (shipments minus sales)

Events are the same on every run (seeded), so the expected read models are
known: `expect` prints the inventory the table must equal.
"""
import json
import os
import random
import subprocess
import sys

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REGISTRY = os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081")
TOPICS = {"shipments": 3, "sales": 3, "users": 2}


def schema(event_type, version):
    with open(os.path.join(ROOT, "schemas", event_type, f"v{version}.avsc")) as f:
        return json.load(f)


def retail_events():
    rng = random.Random(42)
    shipments, sales = [], []
    for n in range(600):
        store, item = f"store-{rng.randint(1, 3)}", f"item-{rng.randint(1, 4)}"
        quantity = rng.randint(1, 9) if n % 4 else rng.randint(1, 4)
        key = f"{store}:{item}"
        if n % 4 == 0:
            sales.append({"schema": "sold", "key": key, "value": {
                "sale_id": f"sale-{n}", "store_id": store, "item_id": item,
                "quantity": quantity, "sold_at": 1_700_000_000_000 + n}})
        else:
            shipments.append({"schema": "received", "key": key, "value": {
                "shipment_id": f"ship-{n}", "store_id": store, "item_id": item,
                "quantity": quantity, "received_at": 1_700_000_000_000 + n}})
    return shipments, sales


def user_events():
    def registered(user, seq, name, email, country):
        return {"schema": "registered", "key": user, "value": {
            "user_id": user, "seq": seq, "name": name, "email": email, "country": country}}
    return [
        # Written by the first release of the sign-up service: v1 (fullName, no country).
        {"schema": "registered_v1", "key": "u0", "value": {
            "user_id": "u0", "seq": 1, "fullName": "Charles Babbage", "email": "charles@example.com"}},
        registered("u1", 1, "Ada Lovelace", "ada@example.com", "GB"),
        registered("u2", 1, "Alan Turing", "alan@example.com", "GB"),
        registered("u3", 1, "Grace Hopper", "grace@example.com", "US"),
        registered("u4", 1, "Edsger Dijkstra", "edsger@example.com", "NL"),
        {"schema": "email", "key": "u1", "value": {"user_id": "u1", "seq": 2, "new_email": "Ada@Analytical.Engine"}},
        {"schema": "deleted", "key": "u4", "value": {"user_id": "u4", "seq": 2}},
    ]


def expected_inventory():
    shipments, sales = retail_events()
    on_hand = {}
    for record, sign in [(r, 1) for r in shipments] + [(r, -1) for r in sales]:
        value = record["value"]
        key = (value["store_id"], value["item_id"])
        on_hand[key] = on_hand.get(key, 0) + sign * value["quantity"]
    return on_hand


def produce(topic, schemas, records):
    spec = {"bootstrap": BOOTSTRAP, "registry": REGISTRY, "topic": topic,
            "subject_strategy": "topic_record", "schemas": schemas}
    lines = "\n".join(json.dumps(x) for x in [spec] + records) + "\n"
    script = os.path.join(ROOT, "tests", "py", "produce.py")
    subprocess.run([sys.executable, script], input=lines.encode(), check=True, stdout=subprocess.DEVNULL)


def set_compatibility(subject, level):
    import urllib.request
    request = urllib.request.Request(
        f"{REGISTRY}/config/{subject}", data=json.dumps({"compatibility": level}).encode(), method="PUT",
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    urllib.request.urlopen(request, timeout=10).read()


def topics_are_empty():
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    existing = admin.list_topics(timeout=10).topics
    missing = [NewTopic(t, p, 1) for t, p in TOPICS.items() if t not in existing]
    if missing:
        for future in admin.create_topics(missing).values():
            future.result()
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "kawka-demo-probe"})
    try:
        for topic, partitions in TOPICS.items():
            for partition in range(partitions):
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                if high > 0:
                    return False
        return True
    finally:
        consumer.close()


def main():
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "produce":
        if not topics_are_empty():
            print("kept")
            return
        shipments, sales = retail_events()
        produce("shipments", {"received": schema("com.example.retail.ShipmentReceived", 1)}, shipments)
        produce("sales", {"sold": schema("com.example.retail.ItemSold", 1)}, sales)
        # Both versions of UserRegistered live in the log: compatibility
        # checks of the subject are off; kawka's catalogue reads both.
        set_compatibility("users-com.example.users.UserRegistered", "NONE")
        produce("users", {
            "registered_v1": schema("com.example.users.UserRegistered", 1),
            "registered": schema("com.example.users.UserRegistered", 2),
            "email": schema("com.example.users.UserEmailChanged", 1),
            "deleted": schema("com.example.users.UserDeleted", 1),
        }, user_events())
        print("fresh")
    elif command == "expect":
        for (store, item), quantity in sorted(expected_inventory().items()):
            print(f"{store}|{item}|{quantity}")
    elif command == "counts":
        shipments, sales = retail_events()
        print(len(shipments) + len(sales), len(user_events()))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

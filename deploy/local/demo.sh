#!/usr/bin/env bash
# The demo: starts the stack (with `kawka registry`), produces the retail and
# profile events with the Confluent client, runs `kawka run` with the shipped
# config/ and connectors/, then shows both read models:
#   * Postgres `inventory`: shipments minus sales per store and item, checked
#     against the same sum computed from the events;
#   * Elasticsearch `user-profiles`: a search for a changed email finds the
#     user, and a profile written as UserRegistered v1 looks like the v2 ones.
# Safe to run again: events are produced only into empty topics.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p "$KAWKA_STATE/logs"
# kawka compiles while the stack installs (noida-db's build, the Python
# packages): two builds fill each other's idle moments on a small machine.
# up.sh --registry then finds it built.
log "building kawka in the background (log: $KAWKA_STATE/logs/demo-build.log)"
(cd "$KAWKA_ROOT" && cargo build --profile demo --bin kawka) >"$KAWKA_STATE/logs/demo-build.log" 2>&1 &
build_pid=$!
trap 'kill "$build_pid" 2>/dev/null || true' EXIT
"$KAWKA_ROOT/deploy/local/up.sh" --registry
wait "$build_pid" || die "building kawka failed: $KAWKA_STATE/logs/demo-build.log"
trap - EXIT
cd "$KAWKA_ROOT"
psql_kawka() { psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -Atq "$@"; }

state=$("$PYTHON" deploy/local/demo.py produce)
if [ "$state" = fresh ]; then
    # New topics (a fresh broker): positions stored for earlier topics of the
    # same names, and what they built, no longer apply.
    log "fresh topics: resetting the demo's read models"
    psql_kawka -c "DROP TABLE IF EXISTS inventory" \
        -c "DO \$\$ BEGIN IF to_regclass('kawka_offsets') IS NOT NULL THEN DELETE FROM kawka_offsets WHERE connector = 'inventory'; END IF; END \$\$"
    curl -fsS -X DELETE "$ELASTICSEARCH_URL/user-profiles-v1" >/dev/null 2>&1 || true
fi
read -r retail_events _ < <("$PYTHON" deploy/local/demo.py counts)

log "running kawka (log: $KAWKA_STATE/logs/demo-kawka.log)"
KAWKA_HTTP_LISTEN=127.0.0.1:0 target/demo/kawka run --config config/kawka.yaml >"$KAWKA_STATE/logs/demo-kawka.log" 2>&1 &
kawka_pid=$!
trap 'kill -TERM $kawka_pid 2>/dev/null || true; wait $kawka_pid 2>/dev/null || true' EXIT

inventory_done() {
    [ "$(psql_kawka -c "SELECT COALESCE(sum(next_offset), 0) FROM kawka_offsets WHERE connector = 'inventory'" 2>/dev/null)" = "$retail_events" ]
}
profiles_done() {
    curl -fsS "$ELASTICSEARCH_URL/user-profiles/_doc/u1" 2>/dev/null | grep -q 'ada@analytical.engine'
}
wait_for "the inventory read model" 120 inventory_done
wait_for "the profile read model" 120 profiles_done

echo
echo "== Postgres: SELECT * FROM inventory (shipments minus sales) =="
psql "$DATABASE_URL" -c "SELECT store_id, item_id, on_hand FROM inventory ORDER BY store_id, item_id"
if diff <(psql_kawka -F'|' -c "SELECT store_id, item_id, on_hand FROM inventory ORDER BY store_id, item_id") \
        <("$PYTHON" deploy/local/demo.py expect) >/dev/null; then
    echo "every row equals shipments minus sales computed from the events"
else
    echo "MISMATCH between the table and the events" >&2
    exit 1
fi

echo
echo "== Elasticsearch: search user-profiles for the changed email ada@analytical.engine =="
curl -fsS -X POST "$ELASTICSEARCH_URL/user-profiles/_refresh" >/dev/null
curl -fsS -H 'Content-Type: application/json' "$ELASTICSEARCH_URL/user-profiles/_search" \
    -d '{"query": {"term": {"email": "ada@analytical.engine"}}, "_source": ["name", "email", "country"]}' \
    | "$PYTHON" -c 'import json, sys
hits = json.load(sys.stdin)["hits"]["hits"]
for hit in hits:
    print(hit["_id"], json.dumps(hit["_source"], sort_keys=True))
print(f"{len(hits)} hit(s)")'
echo
echo "== Elasticsearch: every profile (u0 was written as UserRegistered v1: fullName, no country) =="
curl -fsS -H 'Content-Type: application/json' "$ELASTICSEARCH_URL/user-profiles/_search" \
    -d '{"query": {"match_all": {}}, "size": 100, "_source": ["name", "email", "country"]}' \
    | "$PYTHON" -c 'import json, sys
for hit in sorted(json.load(sys.stdin)["hits"]["hits"], key=lambda h: h["_id"]):
    print(hit["_id"], json.dumps(hit["_source"], sort_keys=True))'
echo
echo "kawka stops now (SIGTERM: it drains, commits and leaves its groups)."

#!/usr/bin/env bash
# Starts the local stack on 127.0.0.1, installing what is missing; safe to run
# again (running services are left alone). Waits until each one answers.
#   Kafka API        tansu        :9092
#   Elasticsearch    noida-db     :9200
#   PostgreSQL       the machine's :5432 (databases kawka and kawka_test)
#   Schema registry  kawka registry :8081 (with --registry; needs a build of kawka)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
with_registry=false
install_options=()
for arg in "$@"; do
    case "$arg" in
        --registry) with_registry=true ;;
        --tests) install_options+=(--tests) ;;
        *) die "unknown option $arg (known: --registry, --tests)" ;;
    esac
done

"$KAWKA_ROOT/deploy/local/install.sh" "${install_options[@]}"
mkdir -p "$KAWKA_STATE/logs"

start_postgres() {
    if pg_isready -q -h 127.0.0.1 -p "$POSTGRES_PORT" 2>/dev/null; then return; fi
    log "starting PostgreSQL"
    local version
    version=$(ls /etc/postgresql | sort -n | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start \
        || sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p "$POSTGRES_PORT"
}

create_database() {
    local name=$1
    if ! psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = '$name'" | grep -q 1; then
        log "creating database $name"
        psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -qc "CREATE DATABASE \"$name\"" || true
    fi
}

start_tansu() {
    if running tansu && tcp_open "$TANSU_PORT"; then return; fi
    tcp_open "$TANSU_PORT" && die "port $TANSU_PORT is taken by another process"
    local binary storage
    binary=$(tansu_binary)
    [ -n "$binary" ] || die "tansu is not installed"
    storage="${TANSU_STORAGE:-memory://tansu/}"
    log "starting tansu on :$TANSU_PORT ($storage)"
    nohup "$binary" broker \
        --listener-url "tcp://127.0.0.1:$TANSU_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$TANSU_PORT" \
        --storage-engine "$storage" >"$KAWKA_STATE/logs/tansu.log" 2>&1 &
    echo $! > "$(pid_file tansu)"
    wait_for tansu 30 tcp_open "$TANSU_PORT"
}

start_noida() {
    if running noida && curl -fsS "http://127.0.0.1:$ELASTICSEARCH_PORT/" >/dev/null 2>&1; then return; fi
    tcp_open "$ELASTICSEARCH_PORT" && die "port $ELASTICSEARCH_PORT is taken by another process"
    local data="$KAWKA_STATE/noida-data"
    # A fresh data dir on each start, unless a test restarts the server on
    # purpose (KAWKA_NOIDA_KEEP_DATA=1: the fault tests).
    if [ "${KAWKA_NOIDA_KEEP_DATA:-0}" != 1 ]; then rm -rf "$data"; fi
    mkdir -p "$data"
    log "starting noida-db (Elasticsearch API) on :$ELASTICSEARCH_PORT"
    nohup "$NOIDA" start --only elasticsearch --host 127.0.0.1 \
        --elasticsearch-port "$ELASTICSEARCH_PORT" --data-dir "$data" >"$KAWKA_STATE/logs/noida.log" 2>&1 &
    echo $! > "$(pid_file noida)"
    wait_for noida-db 60 curl -fsS "http://127.0.0.1:$ELASTICSEARCH_PORT/"
}

start_registry() {
    if running registry && curl -fsS "http://127.0.0.1:$REGISTRY_PORT/subjects" >/dev/null 2>&1; then return; fi
    tcp_open "$REGISTRY_PORT" && die "port $REGISTRY_PORT is taken by another process"
    log "building kawka (profile demo: unoptimised, quick to build)"
    (cd "$KAWKA_ROOT" && cargo build --quiet --profile demo --bin kawka)
    log "starting kawka registry on :$REGISTRY_PORT"
    nohup "$KAWKA_ROOT/target/demo/kawka" registry --listen "127.0.0.1:$REGISTRY_PORT" \
        --database-url "$DATABASE_URL" >"$KAWKA_STATE/logs/registry.log" 2>&1 &
    echo $! > "$(pid_file registry)"
    wait_for "kawka registry" 60 curl -fsS "http://127.0.0.1:$REGISTRY_PORT/subjects"
}

start_postgres
create_database kawka
create_database kawka_test
start_tansu
start_noida
if $with_registry; then start_registry; fi
log "stack up: Kafka $KAFKA_BOOTSTRAP_SERVERS, Elasticsearch $ELASTICSEARCH_URL, Postgres 127.0.0.1:$POSTGRES_PORT$($with_registry && echo ", registry $SCHEMA_REGISTRY_URL")"

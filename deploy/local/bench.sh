#!/usr/bin/env bash
# The end-to-end benchmark: starts the stack, builds kawka in release mode,
# and runs benches/e2e.rs, which measures its baselines (bare consumer,
# Postgres COPY, plain _bulk) and kawka in the same run, then prints the
# rates, the ratios and kawka's peak RSS (JSON in target/bench-e2e.json).
#   deploy/local/bench.sh [--events 1000000] [--es-events N] [--property key=value]…
# (--property: a librdkafka consumer property for the bare consumer and
# kawka's connectors alike, for A/B runs of fetch settings.)
# tansu's memory storage keeps every record in RAM, and noida-db slows down
# as it holds more documents: both are restarted first (noida-db with an
# empty data directory) so earlier runs and tests do not weigh on this one.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
stop_service tansu
stop_service noida
"$KAWKA_ROOT/deploy/local/up.sh"
cd "$KAWKA_ROOT"
cargo build --release --bin kawka
cargo bench --bench e2e -- "$@"

#!/usr/bin/env bash
# Stops what up.sh started (not the machine's PostgreSQL), waiting for each
# process to exit.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
for service in registry noida tansu; do stop_service "$service"; done
log "stack down"

#!/usr/bin/env bash
# All deployment checks (systemd units, pi-gen stage, nginx, cross builds,
# packages) in a sensible order (fast static ones first). For .ci/run:
#   .ci/deploy-all.sh            # everything
#   .ci/deploy-all.sh static     # no Rust builds: units, nginx -t, pi-gen scripts
# Each step is its own script and can be run alone; see deploy/README.md#ci.
set -euo pipefail
# shellcheck source=.ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$EMS_ROOT"

step() { log "### $*"; local t0=$SECONDS; "$@"; log "### $1 done in $((SECONDS - t0))s"; }

step .ci/systemd-verify.sh
step .ci/pi-gen-check.sh
step .ci/nginx-e2e.sh config-test
[[ "${1:-all}" == static ]] && exit 0
step .ci/cross.sh qemu-e2e        # builds aarch64 + armv7, runs aarch64 under qemu
step .ci/nginx-e2e.sh e2e
step .ci/fleet-e2e.sh             # 3 hubs behind nginx on one PostgreSQL, 30 edges, one hub killed
step .ci/packages.sh install-test
log "all deployment checks passed"

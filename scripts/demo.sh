#!/usr/bin/env bash
# One machine, whole pipeline: a hub on the embedded SQLite store, a demo
# device provisioned, the real edge client streaming simulated household
# readings into it, and a terminal dashboard printing them live.
#
#   ./scripts/demo.sh            # Ctrl-C stops everything
#
# State lives in ./demo (database, tokens with mode 0600, spool, logs); run
# it again and it reuses them. The banner ends with the dashboard's address
# and the file holding the demo's viewer token (paste its contents into the
# page; the token itself is never printed).
#
# Environment: EMS_DEMO_PORT (default 8080); EMS_DEMO_DIR (state directory,
# default ./demo); EMS_DEMO_BIN (a directory holding ems-hub and ems-edge:
# use those instead of building); EMS_DEMO_SETUP_ONLY=1 (provision the
# database and the token files, then exit: what the tests run).
set -euo pipefail
cd "$(dirname "$0")/.."

port="${EMS_DEMO_PORT:-8080}"
demo="${EMS_DEMO_DIR:-$PWD/demo}"
db="sqlite:$demo/hub.db"
device="demo-1"

if [[ -n "${EMS_DEMO_BIN:-}" ]]; then
  bin="$EMS_DEMO_BIN"
else
  echo "==> building ems-hub and ems-edge (release)" >&2
  cargo build --release --quiet -p ems-hub -p ems-edge
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
fi
hub="$bin/ems-hub"
edge="$bin/ems-edge"

mkdir -p "$demo/spool"
umask 077
if [[ ! -s "$demo/device-token" ]]; then
  if "$hub" device list --database "$db" | grep -q "^$device\b"; then
    "$hub" device rotate "$device" --database "$db" >"$demo/device-token"
  else
    "$hub" device add "$device" --database "$db" >"$demo/device-token"
  fi
fi
if [[ ! -s "$demo/viewer-token" ]]; then
  "$hub" viewer add "demo-viewer-$$" --device "$device" --database "$db" >"$demo/viewer-token"
fi
chmod 600 "$demo/device-token" "$demo/viewer-token"

cat >"$demo/edge.toml" <<TOML
# Demo edge: the real client, a simulated meter, plain ws:// on loopback.
device_id = "$device"
hub_url = "ws://127.0.0.1:$port"
allow_insecure = true
sample_interval_ms = 1000
spool_dir = "$demo/spool"
trust_clock = true

[[meter]]
id = "main"
kind = "simulated"
TOML

if [[ "${EMS_DEMO_SETUP_ONLY:-}" == 1 ]]; then
  echo "==> set up in $demo (database, device-token, viewer-token, edge.toml)" >&2
  exit 0
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "==> stopped; logs in $demo/*.log, data in $demo/hub.db" >&2
}
trap cleanup EXIT INT TERM

echo "==> hub on 127.0.0.1:$port (log: $demo/hub.log)" >&2
"$hub" serve --listen "127.0.0.1:$port" --database "$db" >"$demo/hub.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done

echo "==> edge streaming as $device (log: $demo/edge.log)" >&2
EMS_DEVICE_TOKEN="$(cat "$demo/device-token")" "$edge" run --config "$demo/edge.toml" >"$demo/edge.log" 2>&1 &
pids+=($!)

echo "==> dashboard: http://127.0.0.1:$port/#fleet (fleet overview; click $device for its live view)" >&2
echo "==> viewer token: in the file $demo/viewer-token — paste its contents into the page's token form" >&2
echo "==> live readings in this terminal (Ctrl-C to stop):" >&2
EMS_VIEWER_TOKEN="$(cat "$demo/viewer-token")" "$hub" watch "$device" --hub "ws://127.0.0.1:$port" &
pids+=($!)
wait "${pids[-1]}"

#!/usr/bin/env bash
# The SQLite writer's CPU per reading at a small fleet's rate, measured in
# a late window (the last 60 s of the run), when the database has grown
# past what the first minute shows. 3,000 devices x 1 Hz against a fresh
# database, nothing pinned, no dashboards; loopback only, bounded.
# Usage: BIN=target/release [DUR=180] bench/scripts/writer-window.sh LABEL [hub serve args]
# Prints: LABEL, the writer thread's and the whole hub's CPU per reading in
# the window, and the generator's verdict lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
LABEL=${1:?usage: writer-window.sh LABEL [hub serve args]}
shift
BIN=${BIN:-target/release}
DUR=${DUR:-180}
PORT=${PORT:-18611}
if [ "$DUR" -lt 70 ]; then echo "DUR must be at least 70 s" >&2; exit 2; fi
W=$(mktemp -d /tmp/ems-writer.XXXXXX)
hub=""
cleanup() { [ -n "$hub" ] && kill "$hub" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
"$BIN/ems-bench" provision --database "sqlite:$W/hub.db" --count 3000 --out "$W/tokens.txt" >/dev/null
(ulimit -n 20000; exec "$BIN/ems-hub" serve --listen "127.0.0.1:$PORT" --database "sqlite:$W/hub.db" \
  --log-level error --max-connections-per-ip 1000000 "$@") >"$W/hub.log" 2>&1 &
hub=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
cpu() { # prints "WRITER_S HUB_S": CPU seconds of the writer thread and of the whole hub
  python3 - "$hub" <<'PY'
import os, sys
pid = sys.argv[1]; tck = os.sysconf("SC_CLK_TCK"); w = t = 0.0
for d in os.listdir(f"/proc/{pid}/task"):
    st = open(f"/proc/{pid}/task/{d}/stat").read()
    name = st[st.index('(') + 1:st.rindex(')')]
    f = st[st.rindex(')') + 2:].split()
    c = (int(f[11]) + int(f[12])) / tck
    t += c
    if name == "ems-writer":
        w += c
print(f"{w:.2f} {t:.2f}")
PY
}
"$BIN/ems-bench" run --label "$LABEL" --target "ws://127.0.0.1:$PORT" --tokens "$W/tokens.txt" \
  --server-pid "$hub" --source-ips 4 --devices 3000 --rate 1 --duration "$DUR" --drain 10 >"$W/gen.txt" 2>&1 &
gen=$!
sleep $((DUR - 65)); a=$(cpu); sleep 60; b=$(cpu)
wait "$gen" || true
python3 - "$LABEL" "$a" "$b" <<'PY'
import sys
label, a, b = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
n = 3000 * 60
w, t = float(b[0]) - float(a[0]), float(b[1]) - float(a[1])
print(f"{label}: writer {w / n * 1e6:.1f} us/reading, hub {t / n * 1e6:.1f} us/reading ({t / 60 * 100:.1f} % of a core), last 60 s")
PY
grep -E '^(sent|latency send->ack|verdict)' "$W/gen.txt"

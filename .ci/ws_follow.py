#!/usr/bin/env python3
"""A dashboard that follows one device and never gives up (stdlib only), for
.ci/fleet-e2e.sh.

Connects to URL (ws:// or wss://) with `Authorization: Bearer $EMS_E2E_BEARER`
(from the environment, so the token is never on a command line), answers
pings, and appends every reading of --device it has not seen before to --out
as "epoch seq ts_ms". When the connection ends (the hub died, nginx closed it,
a refused handshake), it reconnects after a short pause and resumes with the
`ems.resume.<ts_ms>` subprotocol from the newest reading it holds, dropping an
(epoch, seq) it already has, as docs/protocol.md tells clients to. It stops
cleanly when --stop-file exists and prints a one-line summary to stderr:
readings, duplicates dropped, connections.
"""
import argparse, json, os, socket, struct, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ws_client import connect, read_frame, send_frame  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--device", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--cafile")
    ap.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout
    seen = set()
    newest = None
    dups = connections = 0
    last_error = ""
    with open(a.out, "a") as out:
        while time.monotonic() < deadline and not os.path.exists(a.stop_file):
            try:
                offer = "ems.v1" if newest is None else f"ems.v1, ems.resume.{newest}"
                sock = connect(a.url, a.cafile, offer)
            except (OSError, EOFError, ValueError) as e:
                last_error = str(e)
                time.sleep(0.5)
                continue
            connections += 1
            try:
                while not os.path.exists(a.stop_file) and time.monotonic() < deadline:
                    sock.settimeout(0.5)
                    try:
                        opcode, payload = read_frame(sock, rest_timeout=10)
                    except socket.timeout:
                        continue
                    if opcode == 0x8:
                        last_error = f"closed by server: {payload[:2].hex()} {payload[2:]!r}"
                        break
                    elif opcode == 0x1:
                        msg = json.loads(payload)
                        if msg.get("type") != "reading" or msg.get("device_id") != a.device:
                            continue
                        k = (msg["epoch"], msg["seq"])
                        if k in seen:
                            dups += 1
                            continue
                        seen.add(k)
                        out.write(f"{k[0]} {k[1]} {msg['ts_ms']}\n")
                        out.flush()
                        newest = msg["ts_ms"] if newest is None else max(newest, msg["ts_ms"])
                else:
                    send_frame(sock, 0x8, struct.pack("!H", 1000))
            except (OSError, EOFError, ValueError) as e:
                last_error = str(e)
            finally:
                sock.close()
            time.sleep(0.5)
    print(
        f"ws_follow {a.device}: {len(seen)} readings, {dups} duplicates dropped, "
        f"{connections} connections; last error: {last_error or '-'}",
        file=sys.stderr,
    )
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Minimal WebSocket dashboard client for .ci/nginx-e2e.sh (stdlib only).

Connects to URL (ws:// or wss://) with `Authorization: Bearer $EMS_E2E_BEARER`,
answers pings, and prints each text frame (one JSON object per line) until
--count frames whose "device_id" equals --device have arrived (exit 0), or
--timeout seconds pass (exit 1). The token is read from the environment so it
never appears on a command line.
"""
import argparse, json, os, struct, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ws_client import connect, read_frame, send_frame  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--device", required=True)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--cafile")
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout
    try:
        sock = connect(a.url, a.cafile, timeout=a.timeout)
    except OSError as e:
        print(e, file=sys.stderr)
        return 2
    got = 0
    while got < a.count:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        opcode, payload = read_frame(sock)
        if opcode == 0x8:
            print(f"closed by server: {payload[:2].hex()} {payload[2:]!r}", file=sys.stderr)
            return 3
        elif opcode == 0x1:
            msg = json.loads(payload)
            print(json.dumps(msg), flush=True)
            if msg.get("device_id") == a.device and msg.get("type") == "reading":
                got += 1
    send_frame(sock, 0x8, struct.pack("!H", 1000))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, EOFError, ValueError) as e:
        print(f"ws_subscribe: {e}", file=sys.stderr)
        sys.exit(1)

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
import argparse, base64, json, os, socket, ssl, struct, sys, time
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ws_subscribe import recv_exact, send_frame  # noqa: E402


def connect(url, cafile, since_ms):
    u = urlsplit(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "wss" else 80)
    sock = socket.create_connection((host, port), timeout=10)
    if u.scheme == "wss":
        ctx = ssl.create_default_context(cafile=cafile)
        sock = ctx.wrap_socket(sock, server_hostname=host)
    offer = "ems.v1" if since_ms is None else f"ems.v1, ems.resume.{since_ms}"
    key = base64.b64encode(os.urandom(16)).decode()
    req = (
        f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {offer}\r\n"
        f"Authorization: Bearer {os.environ['EMS_E2E_BEARER']}\r\n\r\n"
    )
    sock.sendall(req.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += recv_exact(sock, 1)
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 101 " not in status + " ":
        sock.close()
        raise OSError(f"handshake refused: {status}")
    return sock


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
                sock = connect(a.url, a.cafile, newest)
            except (OSError, EOFError, ValueError) as e:
                last_error = str(e)
                time.sleep(0.5)
                continue
            connections += 1
            try:
                while not os.path.exists(a.stop_file) and time.monotonic() < deadline:
                    sock.settimeout(0.5)
                    try:
                        b0, b1 = recv_exact(sock, 2)
                    except socket.timeout:
                        continue
                    sock.settimeout(10)
                    opcode, n = b0 & 0x0F, b1 & 0x7F
                    if n == 126:
                        n = struct.unpack("!H", recv_exact(sock, 2))[0]
                    elif n == 127:
                        n = struct.unpack("!Q", recv_exact(sock, 8))[0]
                    payload = recv_exact(sock, n)
                    if opcode == 0x9:
                        send_frame(sock, 0xA, payload)
                    elif opcode == 0x8:
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

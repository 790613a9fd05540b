#!/usr/bin/env python3
"""Minimal WebSocket dashboard client for .ci/nginx-e2e.sh (stdlib only).

Connects to URL (ws:// or wss://) with `Authorization: Bearer $EMS_E2E_BEARER`,
answers pings, and prints each text frame (one JSON object per line) until
--count frames whose "device_id" equals --device have arrived (exit 0), or
--timeout seconds pass (exit 1). The token is read from the environment so it
never appears on a command line.
"""
import argparse, base64, json, os, socket, ssl, struct, sys, time
from urllib.parse import urlsplit


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def send_frame(sock, opcode, payload=b""):
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--device", required=True)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--cafile")
    a = ap.parse_args()
    u = urlsplit(a.url)
    host, port = u.hostname, u.port or (443 if u.scheme == "wss" else 80)
    deadline = time.monotonic() + a.timeout
    sock = socket.create_connection((host, port), timeout=a.timeout)
    if u.scheme == "wss":
        ctx = ssl.create_default_context(cafile=a.cafile)
        sock = ctx.wrap_socket(sock, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    req = (
        f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {os.environ['EMS_E2E_BEARER']}\r\n\r\n"
    )
    sock.sendall(req.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += recv_exact(sock, 1)
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 101 " not in status + " ":
        print(f"handshake failed: {status}", file=sys.stderr)
        return 2
    got = 0
    while got < a.count:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        b0, b1 = recv_exact(sock, 2)
        opcode, n = b0 & 0x0F, b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", recv_exact(sock, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", recv_exact(sock, 8))[0]
        payload = recv_exact(sock, n)
        if opcode == 0x9:
            send_frame(sock, 0xA, payload)
        elif opcode == 0x8:
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

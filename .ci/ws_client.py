"""The WebSocket client pieces the CI dashboards share (stdlib only): the
opening handshake with the token from `$EMS_E2E_BEARER` (so it never appears
on a command line), masked client frames, and reading one server frame.
Used by .ci/ws_subscribe.py and .ci/ws_follow.py."""
import base64, os, socket, ssl, struct
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


def connect(url, cafile=None, protocols=None, timeout=10):
    """Open URL (ws:// or wss://) and finish the opening handshake; raises
    OSError naming the status line when the server does not answer 101."""
    u = urlsplit(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "wss" else 80)
    sock = socket.create_connection((host, port), timeout=timeout)
    if u.scheme == "wss":
        ctx = ssl.create_default_context(cafile=cafile)
        sock = ctx.wrap_socket(sock, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    offer = f"Sec-WebSocket-Protocol: {protocols}\r\n" if protocols else ""
    req = (
        f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{offer}Authorization: Bearer {os.environ['EMS_E2E_BEARER']}\r\n\r\n"
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


def read_frame(sock, rest_timeout=None):
    """One unfragmented server frame as (opcode, payload); a ping is answered
    here and returned too, so callers may ignore it. The socket's timeout
    applies to the frame's first bytes (socket.timeout when none came);
    rest_timeout, when given, replaces it for the rest of the frame."""
    b0, b1 = recv_exact(sock, 2)
    if rest_timeout is not None:
        sock.settimeout(rest_timeout)
    opcode, n = b0 & 0x0F, b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", recv_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", recv_exact(sock, 8))[0]
    payload = recv_exact(sock, n)
    if opcode == 0x9:
        send_frame(sock, 0xA, payload)
    return opcode, payload

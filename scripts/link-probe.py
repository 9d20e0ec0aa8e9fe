#!/usr/bin/env python3
"""Raw TCP across a host link (scripts/shaped-links.sh measure): round trip and throughput.

  link-probe.py serve ADDR PORT READY_FILE   accepts one connection (writes READY_FILE once listening)
  link-probe.py send ADDR PORT MB            connects; 200 one-byte ping-pongs (TCP_NODELAY), then MB
                                             megabytes in 1 MiB writes; prints the median round trip and
                                             the throughput the receiver saw (first byte to last byte)
"""
import socket
import statistics
import struct
import sys
import time

PINGS = 200


def recv_exact(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        k = c.recv(n - len(out))
        if not k:
            raise ConnectionError("connection closed early")
        out += k
    return out


def serve(addr: str, port: int, ready: str) -> int:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(1)
    with open(ready, "w") as f:
        f.write("ready\n")
    s.settimeout(30)
    c, _ = s.accept()
    c.settimeout(120)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(PINGS):
        c.sendall(recv_exact(c, 1))
    total = struct.unpack("<Q", recv_exact(c, 8))[0]
    buf = bytearray(1 << 20)
    got = 0
    t0 = None
    while got < total:
        k = c.recv_into(buf, min(len(buf), total - got))
        if not k:
            raise ConnectionError("connection closed after %d of %d bytes" % (got, total))
        if t0 is None:
            t0 = time.perf_counter()
        got += k
    c.sendall(struct.pack("<Qd", got, time.perf_counter() - t0))
    c.close()
    return 0


def send(addr: str, port: int, mb: int) -> int:
    c = socket.create_connection((addr, port), timeout=30)
    c.settimeout(120)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtt = []
    for _ in range(PINGS):
        t0 = time.perf_counter()
        c.sendall(b"x")
        recv_exact(c, 1)
        rtt.append(time.perf_counter() - t0)
    total = mb << 20
    c.sendall(struct.pack("<Q", total))
    block = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(mb):
        c.sendall(block)
    got, secs = struct.unpack("<Qd", recv_exact(c, 16))
    wall = time.perf_counter() - t0
    print(f"link-probe: {addr}: TCP round trip median {statistics.median(rtt) * 1e6:.0f} us "
          f"(p10 {sorted(rtt)[PINGS // 10] * 1e6:.0f}, p90 {sorted(rtt)[PINGS * 9 // 10] * 1e6:.0f}); "
          f"{got} bytes in {secs * 1e3:.1f} ms at the receiver: {got * 8 / secs / 1e9:.2f} Gbit/s "
          f"(sender's wall {wall * 1e3:.1f} ms: {got * 8 / wall / 1e9:.2f} Gbit/s)", flush=True)
    return 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        return serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    if len(sys.argv) == 5 and sys.argv[1] == "send":
        return send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

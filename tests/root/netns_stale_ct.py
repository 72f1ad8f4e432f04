#!/usr/bin/env python3
"""A stale conntrack entry as a way around the rules, for netns_firewall_test.sh (stdlib only).

    netns_stale_ct.py hold HOST PORT GO_FILE  (as credlock: exempt)
        binds PORT, connects to HOST:80 and prints "connected"; once GO_FILE exists, closes
        with an RST (SO_LINGER 0: no TIME_WAIT, PORT is free at once) and prints "closed".
        The test stops conntrack from seeing that close, so the entry stays ESTABLISHED with
        credlock's null NAT binding: what a missed close (an RST from the server) leaves behind.
    netns_stale_ct.py reuse HOST PORT          (as the app user)
        binds the same PORT, connects to HOST:80 (the same tuple) and asks for the role's
        credentials. Prints raw | answer | refused | timeout | error:NAME. Conntrack "ignores"
        a SYN on an ESTABLISHED entry and lets it pass with that entry: rules that refuse only
        `ct state new` let it reach IMDS (raw).
"""

import errno
import os
import socket
import struct
import sys
import time

REQUEST = b"GET /latest/meta-data/iam/security-credentials/credlock-test-role HTTP/1.0\r\nHost: x\r\n\r\n"
RAW_KEYS = (b"ASIAV1", b"ASIAV2", b"ASIAID")  # the IMDS stand-in's own key ids


def sock_for(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    return s


def hold(host: str, port: int, go: str) -> int:
    s = sock_for(host, port)
    s.settimeout(3)
    s.connect((host, 80))
    print("connected", flush=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("closed", flush=True)
    return 0


def reuse(host: str, port: int) -> int:
    try:
        with sock_for(host, port) as s:
            s.settimeout(2)
            s.connect((host, 80))
            s.sendall(REQUEST)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        print("raw" if any(k in data for k in RAW_KEYS) else "answer")
    except socket.timeout:
        print("timeout")
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
            print("refused")
        else:
            print("error:" + errno.errorcode.get(err.errno or 0, str(err.errno)))
    return 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "hold":
        return hold(sys.argv[2].strip("[]"), int(sys.argv[3]), sys.argv[4])
    if len(sys.argv) == 4 and sys.argv[1] == "reuse":
        return reuse(sys.argv[2].strip("[]"), int(sys.argv[3]))
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

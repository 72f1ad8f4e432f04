#!/usr/bin/env python3
"""Classify how a connection attempt ends, for netns_firewall_test.sh (stdlib only).

    netns_probe.py tcp HOST PORT [TIMEOUT]   -> connected | refused | unreachable | timeout | error:NAME
    netns_probe.py udp HOST PORT [TIMEOUT]   -> reply | refused | unreachable | timeout | error:NAME

Prints "<result> <elapsed-ms>". UDP sends "ping" on a connected socket and waits for an answer;
an ICMP error (the firewall's reject, or a closed port) surfaces as ECONNREFUSED/EHOSTUNREACH.
"""

import errno
import socket
import sys
import time

REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}
UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM}


def classify(err: OSError) -> str:
    if isinstance(err, socket.timeout):
        return "timeout"
    if err.errno in REFUSED:
        return "refused"
    if err.errno in UNREACHABLE:
        return "unreachable"
    return "error:" + (errno.errorcode.get(err.errno or 0, str(err.errno)))


def main() -> int:
    if len(sys.argv) not in (4, 5) or sys.argv[1] not in ("tcp", "udp"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    proto, host, port = sys.argv[1], sys.argv[2].strip("[]"), int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) == 5 else 3.0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    start = time.monotonic()
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            if proto == "tcp":
                result = "connected"
            else:
                sock.send(b"ping")
                sock.recv(64)
                result = "reply"
        except OSError as err:
            result = classify(err)
    print(f"{result} {int((time.monotonic() - start) * 1000)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

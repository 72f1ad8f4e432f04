#!/usr/bin/python3
"""One local attacker flooding credlock's IMDS listener (tests/adversarial). Standard library
only: the suite runs it as an unprivileged user (nobody) with /usr/bin/python3.

    flooder.py --mode MODE --target HOST:PORT --conns N --duration S [--rate R] [--max-connects M]

Modes (each connection, reopened whenever credlock closes it, within the rate limit):
  unsent-body     a token PUT announcing Content-Length: 10 whose body never comes; held
  idle-keepalive  one complete GET, its answer read, then the connection idles (keep-alive)
  huge-head       ~390 KiB of header lines (90 lines of 4.3 KiB), the head never finished; held
  trickle         a request line, then one 1 KiB header line every 0.25 s; never finished
  token-put       token PUTs back to back on keep-alive connections, each answer read

Bounded: runs `duration` seconds, opens at most `max-connects` connections in all, at most
`rate` new connections per second after the first N. Connections come from 127.0.0.2-9 so the
ephemeral port range is not exhausted. Prints "started" once the first N connects are under way,
then, at the end, one JSON line of counters (statuses seen, connections opened and closed by the
peer, peak simultaneously open, bytes sent, and raw_seen: answers that contained RAWMARKER).
"""

import argparse
import errno
import json
import re
import selectors
import socket
import sys
import time

MARK = b"RAWMARKER"
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")

UNSENT_BODY = (b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
               b"X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 10\r\n\r\n")
IDLE_GET = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
HUGE_HEAD = (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n"
             + b"".join(b"X-Pad-%02d: " % i + b"p" * 4400 + b"\r\n" for i in range(90)))
TRICKLE_START = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n"
TRICKLE_EVERY = 0.25
TRICKLE_LINES = 80
TOKEN_PUT = (b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
             b"X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n")


class Conn:
    __slots__ = ("sock", "connected", "out", "inbuf", "lines", "next_line", "waiting")

    def __init__(self, sock):
        self.sock = sock
        self.connected = False
        self.out = b""
        self.inbuf = b""
        self.lines = 0
        self.next_line = 0.0
        self.waiting = False  # token-put: a request is out, its answer not yet complete


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True,
                        choices=["unsent-body", "idle-keepalive", "huge-head", "trickle",
                                 "token-put"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--conns", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--max-connects", type=int, default=40000)
    parser.add_argument("--max-requests", type=int, default=400000)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    target = (host, int(port))
    mode = args.mode

    sel = selectors.DefaultSelector()
    conns = {}
    stats = {"mode": mode, "opened": 0, "established": 0, "closed_by_peer": 0,
             "connect_errors": 0, "peak_open": 0, "statuses": {}, "raw_seen": 0,
             "bytes_sent": 0, "requests": 0, "answers": 0, "uid": None}
    import os
    stats["uid"] = os.getuid()
    start = time.monotonic()
    end = start + args.duration
    source = 0

    def first_request():
        if mode == "unsent-body":
            return UNSENT_BODY
        if mode == "idle-keepalive":
            return IDLE_GET
        if mode == "huge-head":
            return HUGE_HEAD
        if mode == "trickle":
            return TRICKLE_START
        return TOKEN_PUT

    def open_one():
        nonlocal source
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        source += 1
        try:
            sock.bind(("127.0.0.%d" % (2 + source % 8), 0))
            err = sock.connect_ex(target)
        except OSError as e:
            err = e.errno
        stats["opened"] += 1
        if err not in (0, errno.EINPROGRESS):
            stats["connect_errors"] += 1
            sock.close()
            return
        conn = Conn(sock)
        conn.out = first_request()
        if mode == "token-put":
            conn.waiting = True
            stats["requests"] += 1
        conns[sock.fileno()] = conn
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def close(conn, by_peer):
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        if by_peer:
            stats["closed_by_peer"] += 1

    def want_write(conn, on):
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        sel.modify(conn.sock, events, conn)

    def count_statuses(data):
        for m in STATUS.finditer(data):
            code = m.group(1).decode()
            stats["statuses"][code] = stats["statuses"].get(code, 0) + 1

    def token_answers(conn):
        """token-put: consume complete answers from inbuf; send the next request after each."""
        while True:
            end_head = conn.inbuf.find(b"\r\n\r\n")
            if end_head < 0:
                return
            head = conn.inbuf[:end_head].lower()
            length = 0
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if m:
                length = int(m.group(1))
            if len(conn.inbuf) < end_head + 4 + length:
                return
            whole = conn.inbuf[:end_head + 4 + length]
            conn.inbuf = conn.inbuf[end_head + 4 + length:]
            stats["answers"] += 1
            if MARK in whole:
                stats["raw_seen"] += 1
            if stats["requests"] < args.max_requests and time.monotonic() < end:
                conn.out += TOKEN_PUT
                stats["requests"] += 1
                want_write(conn, True)

    # The first N connects at once, then the rate limit.
    for _ in range(min(args.conns, args.max_connects)):
        open_one()
    print("started", flush=True)

    while True:
        now = time.monotonic()
        if now >= end:
            break
        budget = min(args.conns - len(conns),
                     int(args.conns + args.rate * (now - start)) - stats["opened"],
                     args.max_connects - stats["opened"])
        for _ in range(max(0, min(budget, 200))):
            open_one()
        for key, events in sel.select(timeout=0.02):
            conn = key.data
            if conn.sock.fileno() not in conns:
                continue
            if events & selectors.EVENT_WRITE:
                if not conn.connected:
                    err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        stats["connect_errors"] += 1
                        close(conn, False)
                        continue
                    conn.connected = True
                    stats["established"] += 1
                    conn.next_line = time.monotonic() + TRICKLE_EVERY
                if conn.out:
                    try:
                        sent = conn.sock.send(conn.out[:65536])
                        stats["bytes_sent"] += sent
                        conn.out = conn.out[sent:]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        close(conn, True)
                        continue
                if not conn.out:
                    want_write(conn, False)
            if events & selectors.EVENT_READ:
                try:
                    data = conn.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(conn, True)
                    continue
                if not data:
                    if MARK in conn.inbuf:
                        stats["raw_seen"] += 1
                    close(conn, True)
                    continue
                count_statuses(data)
                conn.inbuf += data
                if mode == "token-put":
                    token_answers(conn)
                else:
                    if MARK in conn.inbuf:
                        stats["raw_seen"] += 1
                    conn.inbuf = conn.inbuf[-16:]
        stats["peak_open"] = max(stats["peak_open"], len(conns))
        if mode == "trickle":
            now = time.monotonic()
            for conn in list(conns.values()):
                if conn.connected and conn.lines < TRICKLE_LINES and now >= conn.next_line:
                    conn.out += b"X-Trickle-%02d: " % conn.lines + b"t" * 1000 + b"\r\n"
                    conn.lines += 1
                    conn.next_line = now + TRICKLE_EVERY
                    want_write(conn, True)
    stats["open_at_end"] = len(conns)
    stats["elapsed"] = round(time.monotonic() - start, 2)
    print(json.dumps(stats), flush=True)
    for conn in list(conns.values()):
        conn.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A recording HTTP proxy for the S3 tests (tests/s3_source.rs, tests/publish.rs).

Sits between credlock's S3 client (path-style, plain HTTP) and moto, forwards every request
unchanged and records its method, path, headers and the status answered. moto does not
enforce x-amz-expected-bucket-owner; the record shows that credlock sends it.

Modes (set through the control listener), to stand in for S3 failures moto cannot produce:
  forward  pass everything through (the default)
  deny     answer 403 with S3's AccessDenied error document, as S3 does when a bucket policy
           refuses the caller (Amazon S3 API Reference, "Error responses")
  stall    wait `stall_seconds` (at most 60) before forwarding: a slow S3

Usage: recording_proxy.py --upstream http://127.0.0.1:PORT
Prints "listening HOST:PORT" and "control HOST:PORT" on stdout.
Control: GET /requests (the records, JSON), POST /mode {"mode": ..., "stall_seconds": N}.
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"mode": "forward", "stall_seconds": 0.0}
RECORDS = []
LOCK = threading.Lock()
MAX_RECORDS = 10_000
MAX_BODY = 16 * 1024 * 1024

ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message>"
    b"<RequestId>0000000000000000</RequestId></Error>"
)


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = None  # (host, port)

    def log_message(self, fmt, *args):
        pass

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _answer(self, status, headers, body):
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self):
        body = self._body()
        with LOCK:
            mode, stall = STATE["mode"], STATE["stall_seconds"]
        record = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "mode": mode,
        }
        if mode == "stall":
            time.sleep(min(stall, 60.0))
        if mode == "deny":
            status, headers, answer = 403, [("Content-Type", "application/xml")], ACCESS_DENIED
        else:
            conn = http.client.HTTPConnection(*self.upstream, timeout=30)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                response = conn.getresponse()
                status = response.status
                headers = response.getheaders()
                answer = response.read()
            finally:
                conn.close()
        record["status"] = status
        with LOCK:
            if len(RECORDS) < MAX_RECORDS:
                RECORDS.append(record)
        try:
            self._answer(status, headers, answer)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a stall past its timeout)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class Control(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass

    def _json(self, value):
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with LOCK:
            self._json(list(RECORDS))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        change = json.loads(self.rfile.read(length) or b"{}")
        with LOCK:
            if change.get("mode") in ("forward", "deny", "stall"):
                STATE["mode"] = change["mode"]
            if "stall_seconds" in change:
                STATE["stall_seconds"] = float(change["stall_seconds"])
            self._json(dict(STATE))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--control", default="127.0.0.1:0")
    args = parser.parse_args()
    up = urllib.parse.urlsplit(args.upstream)
    Proxy.upstream = (up.hostname, up.port or 80)

    def serve(handler, addr):
        host, port = addr.rsplit(":", 1)
        server = ThreadingHTTPServer((host, int(port)), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server.server_address

    listen = serve(Proxy, args.listen)
    control = serve(Control, args.control)
    print(f"listening {listen[0]}:{listen[1]}", flush=True)
    print(f"control {control[0]}:{control[1]}", flush=True)
    # Ends when stdin closes: the test holds it open and closes it (or dies) when done.
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

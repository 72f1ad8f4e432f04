#!/usr/bin/env python3
"""DEVELOPMENT ONLY stand-in for credlock in netns_firewall_test.sh (CREDLOCK_FW_TEST_STANDIN=1).

A minimal reverse proxy with credlock's listeners (127.0.0.1:8169, [::1]:8169) forwarding
everything to http://169.254.169.254, and an admin listener (127.0.0.1:9169) serving
/metrics with credlock_requests_total. It exists so the firewall test could be developed before
target/debug/credlock did; a run that uses it always reports a FAIL.
"""

import http.client
import http.server
import socket
import sys
import threading

COUNT = {"n": 0}
LOCK = threading.Lock()


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
        upstream.request(self.command, self.path, body=body, headers=headers)
        resp = upstream.getresponse()
        data = resp.read()
        with LOCK:
            COUNT["n"] += 1
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "content-length", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = relay


class Admin(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with LOCK:
            n = COUNT["n"]
        data = f'credlock_requests_total{{route="passthrough",code_class="2xx"}} {n}\n'.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8169
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", port), Proxy),
               V6Server(("::1", port), Proxy),
               http.server.ThreadingHTTPServer(("127.0.0.1", 9169), Admin)]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

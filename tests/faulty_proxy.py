"""An HTTP proxy in front of the test Orthanc that fails requests on purpose, deterministically.

`python faulty_proxy.py PORT UPSTREAM [--every K] [--fail-study UID] [--page-cap N]` listens on
127.0.0.1:PORT (inside the test's network namespace) and forwards each request to UPSTREAM:

- `--every K`: the K-th, 2K-th, … request fails, in turn by a 503 answer, by closing the connection
  without an answer, and by sending the headers and half of the body, then closing.
- `--fail-study UID`: a WADO-RS retrieval of that study always sends half its body; its searches
  pass, so the study is listed and partly fetched.
- `--page-cap N`: a QIDO-RS `limit` above N is lowered to N, as archives that cap a page do.

`GET /_stats` answers the counts as JSON: requests forwarded and faults made, by kind.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("status_503", "dropped", "truncated")


class _State:
    def __init__(self, every: int, fail_study: str | None, page_cap: int | None) -> None:
        self.every, self.fail_study, self.page_cap = every, fail_study, page_cap
        self.lock = threading.Lock()
        self.stats = {"requests": 0, **{k: 0 for k in FAULTS}, "fail_study": 0}

    def fault(self, path: str, accept: str) -> str | None:
        with self.lock:
            self.stats["requests"] += 1
            n = self.stats["requests"]
            retrieval = accept.startswith("multipart/related")  # WADO-RS; QIDO-RS asks for JSON
            if self.fail_study and f"/studies/{self.fail_study}/" in path and retrieval:
                self.stats["fail_study"] += 1
                return "truncated"
            if self.every and n % self.every == 0:
                kind = FAULTS[(n // self.every - 1) % len(FAULTS)]
                self.stats[kind] += 1
                return kind
        return None


def _handler(upstream: str, state: _State) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _forward(self) -> None:
            if self.path == "/_stats":
                body = json.dumps(state.stats).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else None
            fault = state.fault(self.path, self.headers.get("Accept", ""))
            if fault == "dropped":
                self.close_connection = True
                return
            if fault == "status_503":
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                return
            path = self.path
            cap = state.page_cap
            if cap:
                path = re.sub(r"([?&]limit=)(\d+)", lambda m: m[1] + str(min(int(m[2]), cap)), path)
            conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            headers["Accept-Encoding"] = "identity"
            conn.request(self.command, path, body=data, headers=headers)
            answer = conn.getresponse()
            body = answer.read()
            conn.close()
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if fault == "truncated" else body)
            self.wfile.flush()
            self.close_connection = True

        do_GET = do_POST = do_DELETE = _forward

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("upstream")
    parser.add_argument("--every", type=int, default=0)
    parser.add_argument("--fail-study")
    parser.add_argument("--page-cap", type=int)
    args = parser.parse_args()
    state = _State(args.every, args.fail_study, args.page_cap)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(args.upstream, state))
    server.serve_forever()


if __name__ == "__main__":
    main()

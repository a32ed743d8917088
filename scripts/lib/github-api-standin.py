#!/usr/bin/python3
"""Loopback stand-in of GitHub's API for scripts/test-image.sh.

gh is pointed at it with GH_HOST=github.localhost (gh then speaks plain
http to api.github.localhost) and HTTP_PROXY=http://127.0.0.1:PORT: this
server is that proxy. It answers GET with a user and POST (GraphQL) with a
viewer, and appends one line per request to RECORD_FILE:

    METHOD PATH SHA256-OF-THE-AUTHORIZATION-HEADER

(the header's SHA-256, never its characters; `-` when there was none). It
prints `listening on http://127.0.0.1:PORT` as its first line of stdout.

    github-api-standin.py RECORD_FILE
"""

import hashlib
import http.server
import json
import sys

# Bounds on what a client can make this server do.
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 10

USER = {"login": "agent", "id": 1}
VIEWER = {"data": {"viewer": {"login": "agent"}}}


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS

    def record(self):
        auth = self.headers.get("Authorization")
        digest = hashlib.sha256(auth.encode()).hexdigest() if auth else "-"
        with open(self.server.record_file, "a", encoding="ascii") as out:
            out.write(f"{self.command} {self.path} {digest}\n")

    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # gh reads the token's scopes from this header (gh auth status).
        self.send_header("X-OAuth-Scopes", "repo")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.record()
        self.answer(USER)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.send_error(413)
            return
        self.rfile.read(length)
        self.record()
        self.answer(VIEWER)

    def log_message(self, format, *args):
        # Request lines on stderr, never headers.
        sys.stderr.write("standin: %s\n" % (format % args))


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: github-api-standin.py RECORD_FILE")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.record_file = sys.argv[1]
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

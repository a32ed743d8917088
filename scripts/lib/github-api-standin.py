#!/usr/bin/python3
"""Loopback stand-in of GitHub for scripts/test-image.sh.

Plain (the unsealed run): gh is pointed at it with GH_HOST=github.localhost
(gh then speaks plain http to api.github.localhost) and
HTTP_PROXY=http://127.0.0.1:PORT: this server is that proxy. It answers GET
with a user and POST (GraphQL) with a viewer.

With --tls CERT KEY --git-root DIR (the sealed run): the "github.com" and
"api.github.com" the sealed daemon's gateway forwards to
(`--gateway-upstream HOST=127.0.0.1:PORT`), over TLS with CERT (for both
names, from a CA made by the test). Requests for api.github.com get the
answers above, but only with `Authorization: token TOKEN`; requests for
github.com go to `git http-backend` over the bare repositories under DIR
(receive-pack enabled), but only with Basic `x-access-token:TOKEN`. Any
other credential (none, the gh placeholder, a Basic one to the API) is
answered 401: what reaches GitHub must carry what the gateway stamped.

Either way it appends one line per request to RECORD_FILE:

    METHOD HOST PATH STATUS CREDENTIAL-SHA256 AUTHORIZATION-SHA256

(SHA-256 in hex of the token the Authorization header carries, and of the
whole header; never their characters; `-` when absent). It prints
`listening on http://127.0.0.1:PORT` (`https://` with --tls) as its first
line of stdout.

    github-api-standin.py RECORD_FILE [--tls CERT KEY --git-root DIR]
"""

import argparse
import base64
import binascii
import hashlib
import http.server
import json
import os
import ssl
import subprocess
import sys

# Bounds on what a client can make this server do.
MAX_BODY_BYTES = 64 * 1024
MAX_PACK_BYTES = 64 * 1024 * 1024
REQUEST_TIMEOUT_SECONDS = 10
GIT_TIMEOUT_SECONDS = 60

USER = {"login": "agent", "id": 1}
VIEWER = {"data": {"viewer": {"login": "agent"}}}
API_HOST = "api.github.com"
GIT_HOST = "github.com"


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest() if text else "-"


def credential(auth):
    """(scheme, token) from an Authorization value; token None if unparsable."""
    if not auth:
        return None, None
    scheme, _, rest = auth.partition(" ")
    scheme = scheme.lower()
    if scheme in ("token", "bearer"):
        return scheme, rest.strip() or None
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(rest.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return scheme, None
        return ("basic" if user == "x-access-token" else "basic-other"), password or None
    return scheme, None


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS
    protocol_version = "HTTP/1.1"

    def record(self, status):
        auth = self.headers.get("Authorization")
        _, token = credential(auth)
        host = (self.headers.get("Host") or "-").split(":")[0]
        with open(self.server.record_file, "a", encoding="ascii") as out:
            out.write(f"{self.command} {host} {self.path} {status} {sha(token)} {sha(auth)}\n")

    def send_body(self, status, content_type, data, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def answer(self, body):
        # gh reads the token's scopes from X-OAuth-Scopes (gh auth status).
        self.send_body(200, "application/json", json.dumps(body).encode(), [("X-OAuth-Scopes", "repo")])

    def refuse(self, why):
        self.record(401)
        self.send_body(401, "text/plain", f"{why}\n".encode(),
                       [("WWW-Authenticate", 'Basic realm="GitHub"')])

    def body(self, limit):
        """The request body (Content-Length or chunked), None if over limit."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                if len(data) + size > limit:
                    return None
                data += self.rfile.read(size)
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            return None
        return self.rfile.read(length)

    def host(self):
        return (self.headers.get("Host") or "").split(":")[0]

    def api(self, reply):
        if self.server.tls:
            scheme, token = credential(self.headers.get("Authorization"))
            if scheme != "token" or not token or token == "sealed-by-molecule-credd":
                self.refuse("the API wants 'Authorization: token TOKEN'")
                return
        self.record(200)
        self.answer(reply)

    def git(self, data):
        scheme, token = credential(self.headers.get("Authorization"))
        if scheme != "basic" or not token:
            self.refuse("git wants Basic x-access-token:TOKEN")
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.server.git_root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(data)),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
        }
        for header, var in (("Content-Encoding", "HTTP_CONTENT_ENCODING"), ("Git-Protocol", "GIT_PROTOCOL")):
            if self.headers.get(header):
                env[var] = self.headers[header]
        done = subprocess.run(["git", "http-backend"], input=data, env=env, capture_output=True,
                              timeout=GIT_TIMEOUT_SECONDS, check=False)
        head, _, out = done.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, out = done.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.record(status)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        if self.server.tls and self.host() == GIT_HOST:
            self.git(b"")
        elif not self.server.tls or self.host() == API_HOST:
            self.api(USER)
        else:
            self.send_error(404)

    def do_POST(self):
        git = self.server.tls and self.host() == GIT_HOST
        data = self.body(MAX_PACK_BYTES if git else MAX_BODY_BYTES)
        if data is None:
            self.send_error(413)
            self.close_connection = True
            return
        if git:
            self.git(data)
        elif not self.server.tls or self.host() == API_HOST:
            self.api(VIEWER)
        else:
            self.send_error(404)

    def log_message(self, format, *args):
        # Request lines on stderr, never headers.
        sys.stderr.write("standin: %s\n" % (format % args))


def main():
    parser = argparse.ArgumentParser(description="GitHub stand-in for scripts/test-image.sh")
    parser.add_argument("record_file")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--git-root")
    args = parser.parse_args()
    if bool(args.tls) != bool(args.git_root):
        parser.error("--tls and --git-root go together")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.record_file = args.record_file
    server.tls = bool(args.tls)
    server.git_root = args.git_root
    scheme = "http"
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*args.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    print(f"listening on {scheme}://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

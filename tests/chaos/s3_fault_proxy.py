"""A fault-injecting HTTP proxy in front of the S3 server: throttling, server errors, connection resets.

Run as its own process on 127.0.0.1 (a Python server thread inside the process that drives Ray
stalls the job on a 2-CPU machine)::

    python -m tests.chaos.s3_fault_proxy --upstream http://127.0.0.1:5000 --port 5001

Every request is forwarded to ``--upstream`` unchanged (path-style S3, so the bucket is the first
path segment). Faults hit **GET object** requests only (not listings, HEADs or writes), chosen
deterministically: a key is *faulty* when ``sha256(seed:key)`` falls below ``fraction``, and a
faulty key's first ``fail_first`` GETs get a fault instead of its bytes, the kind rotating through
``kinds``:

* ``slowdown`` — ``503 SlowDown`` with S3's XML error body (what S3 answers a throttled prefix);
* ``internal`` — ``500 InternalError`` with S3's XML error body;
* ``reset`` — the TCP connection is reset (``SO_LINGER`` 0, then close) before any response byte.

So the same seed gives the same faulty keys and the same number of faults, whatever the timing:
a client that retries at least ``fail_first`` times reads every object; one that does not loses
exactly the faulty keys.

**Stalled writes** (for interrupting an upload midway): with ``stall_pattern`` (a regex on
``bucket/key``) set, the writes (PUT: a single upload or one part of a multipart upload) to the
``stall_nth``-th distinct key that matches are held: never forwarded, the connection kept open
until ``stall_release`` is posted (or 300 s pass), then reset. ``stalled`` in the counters lists
the keys whose writes are being or were held, so a test can kill the writer while it waits.

**Held reads** (for a read deadline): with ``hold_get_pattern`` (a regex on ``bucket/key``) set,
every object GET that matches is held the same way: no response byte, the connection open until
``stall_release`` (or 300 s), then reset; ``held_gets`` counts them.

Control endpoint (not forwarded): ``GET /__faults__`` returns the counters as JSON;
``POST /__faults__`` with a JSON body sets ``fraction``, ``fail_first``, ``seed``, ``kinds`` and
resets the counters.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from urllib.parse import unquote, urlsplit

CONTROL_PATH = "/__faults__"
KINDS = ("slowdown", "internal", "reset")
_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<Resource>{resource}</Resource><RequestId>chaos-proxy</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultPlan:
    """Which keys fail, how often, and what was injected (shared by the handler threads)."""

    def __init__(self, fraction: float = 0.0, fail_first: int = 2, seed: int = 0, kinds=KINDS) -> None:
        self.lock = threading.Lock()
        self.configure(fraction=fraction, fail_first=fail_first, seed=seed, kinds=list(kinds))

    def configure(self, **settings) -> None:
        with self.lock:
            self.fraction = float(settings.get("fraction", getattr(self, "fraction", 0.0)))
            self.fail_first = int(settings.get("fail_first", getattr(self, "fail_first", 2)))
            self.seed = int(settings.get("seed", getattr(self, "seed", 0)))
            self.kinds = [k for k in settings.get("kinds", getattr(self, "kinds", KINDS)) if k in KINDS]
            self.gets: dict[str, int] = {}  # object GETs seen per faulty key
            self.injected = {k: 0 for k in KINDS}
            self.faulty_keys: set[str] = set()
            self.requests = 0
            self.object_gets = 0
            self.stall_pattern = settings.get("stall_pattern") or None
            self.stall_nth = int(settings.get("stall_nth", 1))
            self.stall_matches: list[str] = []  # distinct keys that matched, in order
            self.stalled: list[str] = []
            self.hold_get_pattern = settings.get("hold_get_pattern") or None
            self.held_gets = 0
            if hasattr(self, "release"):
                self.release.set()  # writes held under the old settings are let go (reset)
            self.release = threading.Event()

    def stall_for(self, key: str) -> threading.Event | None:
        """The event to wait on before resetting this write of ``key``, or None to forward it."""
        with self.lock:
            if not self.stall_pattern or not re.search(self.stall_pattern, key):
                return None
            if key not in self.stall_matches:
                self.stall_matches.append(key)
            if self.stall_matches.index(key) + 1 != self.stall_nth:
                return None
            if key not in self.stalled:
                self.stalled.append(key)
            return self.release

    def hold_get(self, key: str) -> threading.Event | None:
        """The event to wait on before resetting this GET of ``key``, or None to serve it."""
        with self.lock:
            if not self.hold_get_pattern or not re.search(self.hold_get_pattern, key):
                return None
            self.held_gets += 1
            return self.release

    def _score(self, key: str) -> int:
        return int(hashlib.sha256(f"{self.seed}:{key}".encode()).hexdigest()[:8], 16)

    def fault_for(self, key: str) -> str | None:
        """The fault for this GET of ``key`` (and count it), or None to forward it."""
        with self.lock:
            self.object_gets += 1
            score = self._score(key)
            if not self.kinds or score / 2**32 >= self.fraction:
                return None
            self.faulty_keys.add(key)
            n = self.gets.get(key, 0)
            self.gets[key] = n + 1
            if n >= self.fail_first:
                return None
            kind = self.kinds[(n + score) % len(self.kinds)]
            self.injected[kind] += 1
            return kind

    def stats(self) -> dict:
        with self.lock:
            return {
                "fraction": self.fraction,
                "fail_first": self.fail_first,
                "seed": self.seed,
                "kinds": list(self.kinds),
                "requests": self.requests,
                "object_gets": self.object_gets,
                "injected": dict(self.injected),
                "injected_total": sum(self.injected.values()),
                "faulty_keys": sorted(self.faulty_keys),
                "stall_pattern": self.stall_pattern,
                "stall_matches": list(self.stall_matches),
                "stalled": list(self.stalled),
                "hold_get_pattern": self.hold_get_pattern,
                "held_gets": self.held_gets,
            }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    server: _ProxyServer

    def log_message(self, fmt: str, *args) -> None:  # quiet
        pass

    # ---------------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = BytesIO()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out.getvalue()
                out.write(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, head: bool = False) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(
                self.server.upstream_host, self.server.upstream_port, timeout=60
            )
            self._conn = conn
        return conn

    def _reset(self) -> None:
        """Reset the TCP connection: RST instead of FIN, no response byte."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.wfile = BytesIO()  # finish() flushes into this, not the dead socket
        self.connection.close()

    def _object_key(self) -> str | None:
        """``bucket/key`` for a path-style request on an object (None for listings and buckets)."""
        parts = urlsplit(self.path)
        path = unquote(parts.path).lstrip("/")
        if "/" not in path or path.endswith("/"):
            return None
        if self.command == "GET" and any(
            q.split("=")[0] in ("list-type", "uploads", "uploadId", "delimiter")
            for q in parts.query.split("&")
        ):
            return None
        return path

    # ---------------------------------------------------------------------------------- methods
    def _forward(self) -> None:
        with self.server.plan.lock:
            self.server.plan.requests += 1
        body = self._body()
        if self.command == "GET":
            key = self._object_key()
            hold = self.server.plan.hold_get(key) if key else None
            if hold is not None:
                hold.wait(300)
                self._reset()
                return
            kind = self.server.plan.fault_for(key) if key else None
            if kind == "reset":
                self._reset()
                return
            if kind is not None:
                code, status, message = (
                    ("SlowDown", 503, "Please reduce your request rate.")
                    if kind == "slowdown"
                    else ("InternalError", 500, "We encountered an internal error. Please try again.")
                )
                xml = _ERROR_XML.format(code=code, message=message, resource="/" + key).encode()
                self._send(
                    status,
                    [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))],
                    xml,
                )
                return
        if self.command == "PUT":
            key = self._object_key()
            release = self.server.plan.stall_for(key) if key else None
            if release is not None:
                release.wait(300)
                self._reset()
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers.pop("Content-Length", None)
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have gone stale
            conn = self._upstream()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                conn.close()
                self._conn = None
                if attempt:
                    raise
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
        if self.command == "HEAD":
            out.append(("Content-Length", resp.getheader("Content-Length", "0")))
        else:
            out.append(("Content-Length", str(len(data))))
        self._send(resp.status, out, data, head=self.command == "HEAD")

    def _control(self) -> bool:
        if urlsplit(self.path).path != CONTROL_PATH:
            return False
        if self.command == "POST":
            settings = json.loads(self._body() or b"{}")
            if settings.pop("stall_release", False):
                self.server.plan.release.set()
            if settings:
                self.server.plan.configure(**settings)
        data = json.dumps(self.server.plan.stats()).encode()
        self._send(200, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))], data)
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._control():
            self._forward()

    def do_POST(self) -> None:  # noqa: N802
        if not self._control():
            self._forward()

    do_HEAD = do_PUT = do_DELETE = _forward  # noqa: N815


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: str, plan: FaultPlan) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.plan = plan

    def handle_error(self, request, client_address) -> None:  # a reset or a client gone: not news
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="the S3 server, e.g. http://127.0.0.1:5000")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fraction", type=float, default=0.0, help="share of keys that get faults")
    p.add_argument("--fail-first", type=int, default=2, help="faulted GETs per faulty key")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    plan = FaultPlan(args.fraction, args.fail_first, args.seed)
    _ProxyServer(args.port, args.upstream, plan).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

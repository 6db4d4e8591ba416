"""A real threaded HTTP server on 127.0.0.1 serving test-made files, with scripted misbehaviour.

Each served path has a plan: the behaviours its next requests get, in order (then ``"ok"``):

- ``"ok"``: honours ``Range: bytes=N-`` (206 + Content-Range; 416 past the end), else 200;
- ``("cut", n)``: like ok, but the connection is closed after ``n`` body bytes;
- ``("stall", n, seconds)``: like ok, but waits ``seconds`` after ``n`` body bytes;
- ``("status", code)``: answers ``code`` with an empty body;
- ``"norange"``: ignores Range, always 200 with the whole file;
- ``("redirect", location)``: answers 302 with that ``Location``;
- ``"endless"``: 200 without Content-Length, the file's bytes over and over until the client
  goes away (a body that never ends);
- ``("trickle", n, seconds)``: 200 without Content-Length, ``n`` bytes every ``seconds``, forever.

Requests are logged (path, Range header, whether it came through as a proxy request), so tests
can assert what the client really asked for. Works as a forward proxy too: a request line with
an absolute URL is served by its path.
"""
from __future__ import annotations

import re
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None
    proxied: bool


class ArchiveServer:
    """``with ArchiveServer() as s: url = s.add("/a.zip", data, plan=[("cut", 100)])``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list] = {}
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, data: bytes, plan: list | tuple = ()) -> str:
        """Serve ``data`` at ``path`` (with a behaviour plan); returns its URL."""
        with self._lock:
            self.files[path] = data
            self.plans[path] = list(plan)
        return self.base_url + path

    def requests_for(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _next(self, request: Request):
        with self._lock:
            self.requests.append(request)
            plan = self.plans.get(request.path, [])
            return self.files.get(request.path), (plan.pop(0) if plan else "ok")

    def __enter__(self) -> "ArchiveServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler_for(server: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            request = Request(parts.path, self.headers.get("Range"), bool(parts.scheme))
            data, behaviour = server._next(request)
            try:
                self._answer(data, behaviour, request.range)
            except (ConnectionError, TimeoutError):
                pass  # the client gave up (e.g. after its read timeout): nothing to do

        def _answer(self, data: bytes | None, behaviour, range_header: str | None) -> None:
            kind = behaviour if isinstance(behaviour, str) else behaviour[0]
            if data is None:
                return self._empty(404)
            if kind == "status":
                return self._empty(behaviour[1])
            if kind == "redirect":
                return self._empty(302, {"Location": behaviour[1]})
            if kind in ("endless", "trickle"):
                return self._forever(data, behaviour)
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and kind != "norange":
                start = int(match.group(1))
                if start >= len(data):
                    return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if kind == "cut":
                self.wfile.write(body[:behaviour[1]])
                self.wfile.flush()
                self.close_connection = True
                return
            if kind == "stall":
                self.wfile.write(body[:behaviour[1]])
                self.wfile.flush()
                if server.stopping.wait(behaviour[2]):
                    return
                body = body[behaviour[1]:]
            self.wfile.write(body)

        def _forever(self, data: bytes, behaviour) -> None:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            step, pause = (len(data), 0.0) if behaviour == "endless" else behaviour[1:]
            position = 0
            while not server.stopping.is_set():
                self.wfile.write((data * 2)[position:position + step] if step else b"")
                self.wfile.flush()
                position = (position + step) % max(len(data), 1)
                if pause and server.stopping.wait(pause):
                    return

        def _empty(self, code: int, headers: dict | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler

"""A loopback HTTP server that serves the embedded corpus to the crawler, faults included.

The crawl stage points img2dataset at real ``http://`` URLs so that the same code path crawls
the embedded corpus and a user's URL list. Paths (relative to the corpus root, as in
``pairs.parquet``)::

    images/<name>            the corpus image (a member of images.zip), image/jpeg
    fault/<kind>/<n>.jpg     one of the faults of CORPUS.md (FAULTS below)
    anything else            404

The server only binds 127.0.0.1 on a free port and lives exactly as long as the
:func:`serve_corpus` block: it is shut down and its socket closed on every exit path.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from .corpus_images import CorpusImages


@dataclass(frozen=True)
class Fault:
    """How the server answers one kind of fault URL."""
    status: int = 200
    body_file: str | None = None       # under <corpus>/faults/
    content_type: str = "image/jpeg"
    headers: dict = field(default_factory=dict)
    stall: bool = False                # answer nothing until the client has given up


FAULTS: dict[str, Fault] = {
    "http_404": Fault(status=404),
    "http_500": Fault(status=500),
    "timeout": Fault(stall=True),
    # A soft error page served as if it were a JPEG: only decoding can tell.
    "not_an_image": Fault(body_file="not_an_image.html"),
    "truncated_jpeg": Fault(body_file="truncated.jpg"),
    "too_large": Fault(body_file="too_large.png", content_type="image/png"),
    # A valid image whose owner opted out of AI training: the crawler must honour the header.
    "opted_out": Fault(body_file="opted_out.jpg", headers={"X-Robots-Tag": "noai"}),
}

# How much longer than the crawler's timeout a "timeout" URL stalls: long enough that no
# client-side jitter lets a response through, and cut short when the server stops.
STALL_FACTOR = 3.0


class CorpusServer(ThreadingHTTPServer):
    # The crawler opens dozens of connections at once; the default backlog (5) makes the kernel
    # drop SYNs under that burst, and each retransmit costs the client a full second.
    request_queue_size = 256
    daemon_threads = True

    def __init__(self, corpus_dir: Path, timeout_s: float):
        self.corpus_dir = Path(corpus_dir).resolve()
        self.images = CorpusImages(self.corpus_dir)          # images.zip, read by the handler threads
        self.stall_s = timeout_s * STALL_FACTOR
        self.stopping = threading.Event()     # wakes stalled handlers at shutdown
        # Fault bodies are few and small: read once, not per request.
        self.bodies = {f.body_file: (self.corpus_dir / "faults" / f.body_file).read_bytes()
                       for f in FAULTS.values() if f.body_file}
        super().__init__(("127.0.0.1", 0), CorpusHandler)

    def server_close(self):
        super().server_close()
        self.images.close()

    def handle_error(self, request, client_address):
        # A client that timed out (the "timeout" fault) closes its end before we answer; the
        # resulting broken pipe is expected. Anything else is a bug worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class CorpusHandler(BaseHTTPRequestHandler):
    server: CorpusServer

    def log_message(self, format, *args):   # noqa: A002 (the base class's signature)
        """Quiet: one line per request would flood the stage's log with 20k lines."""

    def do_GET(self):
        parts = self.path.split("?", 1)[0].lstrip("/").split("/")
        if len(parts) == 2 and parts[0] == "images":
            self._serve_image(parts[1])
        elif len(parts) == 3 and parts[0] == "fault" and parts[1] in FAULTS:
            self._serve_fault(FAULTS[parts[1]])
        else:
            self.send_error(404)

    def _serve_image(self, name: str):
        # a member of the archive or nothing: no path reaches the file system
        member = f"images/{name}"
        if member not in self.server.images:
            self.send_error(404)
            return
        self._send(200, self.server.images.read(member), "image/jpeg")

    def _serve_fault(self, fault: Fault):
        if fault.stall:
            self.server.stopping.wait(self.server.stall_s)
            return      # close without a response
        if fault.body_file is None:
            self.send_error(fault.status)
            return
        self._send(fault.status, self.server.bodies[fault.body_file], fault.content_type, fault.headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serve_corpus(corpus_dir: Path, timeout_s: float) -> Iterator[str]:
    """Serve ``corpus_dir`` on a free loopback port; yields the base URL (no trailing slash).

    ``timeout_s`` is the crawler's timeout: "timeout" fault URLs stall ``STALL_FACTOR`` times as
    long. On exit, stalled handlers are woken, the serve loop stops and the socket is closed.
    """
    server = CorpusServer(corpus_dir, timeout_s)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="corpus-server", daemon=True)
    try:
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stopping.set()
        if thread.is_alive():
            server.shutdown()
        server.server_close()

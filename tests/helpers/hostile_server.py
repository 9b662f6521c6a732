"""A loopback HTTP server with the answers an untrusted URL list can lead the crawler to: redirects
(to file://, data:, other hosts), bodies over any cap (with and without a Content-Length), a
server that drip-feeds its body, X-Robots-Tag opt-outs aimed at the crawler or at another one,
a URL that fails once and then works, and images whose header declares a huge size.

Routes (GET)::

    /img/<i>.jpg             a distinct 64 px JPEG (:func:`jpeg`)
    /redirect?to=<url>       302 to <url>
    /big-declared            Content-Length 64 MiB, then zeros until the client hangs up
    /big-streamed            no Content-Length (HTTP/1.0, the body ends at close): zeros, ditto
    /drip                    Content-Length 10^6, one byte every DRIP_S s
    /robots/<token>.jpg      a JPEG with ``X-Robots-Tag: <token>: noai`` (token "none": untargeted)
    /flaky/<name>.jpg        503 on the first request for <name>, the JPEG afterwards
    /always503/<name>.jpg    503 every time
    /bomb.png, /bomb.jpg     a small file whose header declares BOMB_SIDE x BOMB_SIDE px
"""
from __future__ import annotations

import io
import struct
import threading
import time
import urllib.parse
import zlib
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageDraw

DRIP_S = 0.3
BOMB_SIDE = 8192           # 67 Mpx: 256 MiB as RGBA; the crawl's max_image_area is 1 Mpx
STREAM_LIMIT_S = 20.0      # a streaming handler gives up after this, whoever is listening


def jpeg(i: int, size: int = 64) -> bytes:
    """A distinct RGB JPEG: a disc whose place and color follow ``i``."""
    img = Image.new("RGB", (size, size), (250, 250, 250))
    r = size // 5
    cx, cy = size // 4 + (i * 7) % (size // 2), size // 4 + (i * 13) % (size // 2)
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r),
                                fill=((40 * i) % 256, (90 + 70 * i) % 256, (200 - 30 * i) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_declaring(side: int) -> bytes:
    """A 16 px RGBA PNG whose IHDR (CRC recomputed) declares ``side`` x ``side`` px: what a
    decompression bomb shows before its pixels are decoded."""
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)                 # IHDR: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_declaring(side: int) -> bytes:
    """A plain RGB JPEG whose frame header (SOF0) declares ``side`` x ``side`` px."""
    data = bytearray(jpeg(0, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)      # height, width
    return bytes(data)


class HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: C901 -- one route table
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, urllib.parse.parse_qs(url.query)
        self.server.requests.append(path)
        if path.startswith("/img/"):
            return self.send(200, jpeg(int(path[5:].split(".")[0])))
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/big-declared":
            return self.stream(b"\0" * 65536, length=64 << 20)
        if path == "/big-streamed":
            self.protocol_version = "HTTP/1.0"
            return self.stream(b"\0" * 65536, length=None)
        if path == "/drip":
            return self.stream(b"\xff", length=10 ** 6, pause=DRIP_S)
        if path.startswith("/robots/"):
            token = path[len("/robots/"):].split(".")[0]
            value = "noai" if token == "none" else f"{token}: noai"
            return self.send(200, jpeg(3), {"X-Robots-Tag": value})
        if path.startswith("/flaky/"):
            with self.server.lock:
                first = path not in self.server.seen
                self.server.seen.add(path)
            return self.send(503, b"try later") if first else self.send(200, jpeg(5))
        if path.startswith("/always503/"):
            return self.send(503, b"try later")
        if path == "/bomb.png":
            return self.send(200, png_declaring(BOMB_SIDE), content_type="image/png")
        if path == "/bomb.jpg":
            return self.send(200, jpeg_declaring(3000))
        return self.send(404, b"not found")

    def send(self, status: int, body: bytes, headers: dict | None = None, content_type: str = "image/jpeg"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def stream(self, piece: bytes, length: int | None, pause: float = 0.0):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < STREAM_LIMIT_S and not self.server.stopping.is_set():
                self.wfile.write(piece)
                self.wfile.flush()
                if pause:
                    self.server.stopping.wait(pause)
        except OSError:
            pass                                  # the client hung up: what the crawler should do
        self.close_connection = True


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HostileHandler)
        self.requests: list[str] = []
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()


@contextmanager
def hostile_server():
    """The server on 127.0.0.1 (a free port): yields (base URL, server)."""
    httpd = HostileServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", httpd
    finally:
        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()

"""A user's own data, as users' lists serve it: images in every format the crawl must take (PNG
with alpha or a palette, grayscale/CMYK/EXIF-rotated JPEG, WebP, animated GIF, non-square, too
small), captions of every kind (Unicode, emoji, one word, empty, longer than CLIP's context),
served by a loopback HTTP server of the test's own, and a URL list without ground truth."""
from __future__ import annotations

import functools
import io
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (255, 255, 255)
PALETTE = [(220, 40, 40), (40, 170, 60), (40, 70, 220), (235, 210, 40), (140, 50, 170), (240, 140, 30)]


COLORS = ("red", "green", "blue", "yellow", "purple", "orange")     # PALETTE's names
COULEURS = ("rouge", "vert", "bleu", "jaune", "violet", "orange")
SIZES = ("small", "medium", "large", "huge")
SHAPES = ("disc", "square")


def _layout(i: int) -> dict:
    """What image ``i`` shows: place (7 x 7), color (6), size (4) and shape (2) differ for every i
    below 2352, so no two images are duplicates."""
    return {"col": i % 7, "row": (i // 7) % 7, "color": (i // 49) % len(PALETTE), "size": (i // 294) % 4,
            "shape": (i // 1176) % 2}


def _scene(i: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """An RGBA scene (see :func:`_layout`): a colored disc or square on a transparent background
    (alpha 0 outside it)."""
    w, h = size
    lay = _layout(i)
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    r = min(w, h) // 6 + lay["size"] * 3
    cx, cy = w // 2 + (lay["col"] - 3) * max(1, w // 16), h // 2 + (lay["row"] - 3) * max(1, h // 16)
    draw = ImageDraw.Draw(img).ellipse if lay["shape"] == 0 else ImageDraw.Draw(img).rectangle
    draw((cx - r, cy - r, cx + r, cy + r), fill=(*PALETTE[lay["color"]], 255))
    return img


def describe(i: int) -> str:
    """The English caption of image ``i``: what a user's list would say about it."""
    lay = _layout(i)
    where = (("top " if lay["row"] < 2 else "bottom " if lay["row"] > 4 else "")
             + ("left" if lay["col"] < 2 else "right" if lay["col"] > 4 else "center"))
    return f"a {SIZES[lay['size']]} {COLORS[lay['color']]} {SHAPES[lay['shape']]}, {where}"


def caption(style: str, i: int) -> str:
    """Caption of image ``i`` in ``style`` (see :data:`STYLES`): all but the empty one say what the
    image shows, so a model trained on the list has something to learn."""
    lay = _layout(i)
    if style == "english":
        return describe(i)
    if style == "french":                    # Unicode (accents, a cedilla) in the middle of the words
        forme = ("disque", "carré")[lay["shape"]]
        return f"un {forme} {COULEURS[lay['color']]}, façon café crème"
    if style == "emoji":
        return f"🐱 {describe(i)} 🎨"
    if style == "one_word":
        return COLORS[lay["color"]]
    if style == "empty":
        return ""
    if style == "long":                      # 8-9 words, then filler: > CLIP's context, < 40 words
        return f"{describe(i)} " + " ".join(["on a plain background seen from far away"] * 3)
    raise ValueError(style)


def _on(img: Image.Image, bg=(90, 120, 150)) -> Image.Image:
    canvas = Image.new("RGBA", img.size, (*bg, 255))
    return Image.alpha_composite(canvas, img).convert("RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def encode(kind: str, i: int) -> tuple[str, bytes]:
    """(file name suffix, bytes) of image ``i`` in format ``kind`` (see :data:`KINDS`)."""
    scene = _scene(i)
    if kind == "jpeg":
        return ".jpg", _save(_on(scene), "JPEG", quality=95)
    if kind == "png_rgba":
        return ".png", _save(scene, "PNG")
    if kind == "png_la":
        return ".png", _save(scene.convert("LA"), "PNG")
    if kind == "png_palette":                       # palette with a transparent index (the background's)
        p = _on(scene, (0, 0, 0)).quantize(8)
        return ".png", _save(p, "PNG", transparency=int(np.asarray(p)[0, 0]))
    if kind == "jpeg_gray":
        return ".jpg", _save(_on(scene).convert("L"), "JPEG", quality=95)
    if kind == "jpeg_cmyk":
        return ".jpg", _save(_on(scene).convert("CMYK"), "JPEG", quality=95)
    if kind == "jpeg_exif_rotated":                 # stored sideways, EXIF orientation 6 (rotate 90 CW to view)
        upright = _on(_scene(i, (SIZE, SIZE * 3 // 2)))
        exif = Image.Exif()
        exif[0x0112] = 6
        return ".jpg", _save(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    if kind == "webp":
        return ".webp", _save(scene, "WEBP", lossless=True)
    if kind == "gif_animated":                      # frame 0 is the scene; frame 1 is all black
        frames = [_on(scene), Image.new("RGB", (SIZE, SIZE), (0, 0, 0))]
        return ".gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    if kind == "nonsquare":
        return ".jpg", _save(_on(_scene(i, (SIZE * 3 // 2, SIZE))), "JPEG", quality=95)
    if kind == "too_small":                         # below filter.min_size (32), above crawl.min_image_size (8)
        return ".jpg", _save(_on(_scene(i, (20, 20))), "JPEG", quality=95)
    raise ValueError(kind)


KINDS = ("jpeg", "png_rgba", "png_la", "png_palette", "jpeg_gray", "jpeg_cmyk", "jpeg_exif_rotated", "webp",
         "gif_animated", "nonsquare", "too_small")
STYLES = ("english", "french", "emoji", "one_word", "empty", "long")
MISSING = 3          # URLs that answer 404


def build_site(site: Path, n: int) -> list[dict]:
    """Write ``n`` images (formats cycling through :data:`KINDS`, caption styles through
    :data:`STYLES`) into ``site`` and return the list's rows (``path``, ``caption``, ``kind``,
    ``style``; URLs are made once the server's port is known), plus :data:`MISSING` rows whose
    files do not exist."""
    site.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        suffix, data = encode(kind, i)
        name = f"img{i:05d}{suffix}"
        (site / name).write_bytes(data)
        style = STYLES[(i // len(KINDS)) % len(STYLES)]
        rows.append({"path": name, "caption": caption(style, i), "kind": kind, "style": style})
    rows += [{"path": f"missing{k}.jpg", "caption": "gone", "kind": "missing", "style": "english"}
             for k in range(MISSING)]
    return rows


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class LoopbackServer(ThreadingHTTPServer):
    request_queue_size = 256        # the crawler opens many connections at once
    daemon_threads = True


@contextmanager
def static_server(directory: Path):
    """Serve ``directory`` on 127.0.0.1 (a free port) for the duration of the block."""
    httpd = LoopbackServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()

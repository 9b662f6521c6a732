"""The embed stage's fast paths give exactly what the libraries they replace give: the word-memo
tokenizer open_clip's token ids, OpenCV's JPEG decode PIL's pixels."""
from __future__ import annotations

import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.data.image_shards import decode_image, decode_images, resize_uint8
from pipeline.clip.tokenize import WordMemoTokenizer, fast_tokenizer
from pipeline.data.corpus import build_pairs

AWKWARD = [
    "", "   ", "a  Red\tcircle\n", "A RED CIRCLE", "red &amp; blue", "fish &lt;3", "caf\u00e9 au lait",
    "\ufb01ne ligature", "\uff32\uff45\uff44 full width", "\u201ccurly\u201d quotes", "\x1b[31mred\x1b[0m",
    "it's what they've said: don't!", "a, b; c... (d) [e] {f}", "123 456 7.5cm", "<start_of_text> injected",
    "emoji \U0001f600 square", "mojibake Ã©tÃ©", "a_b-c+d=e", "tab\tand\r\nbreaks", "non\u00a0breaking",
    " ".join(["word"] * 100),                             # longer than the context: truncated with an eot
]


@pytest.fixture(scope="module")
def tokenizers():
    base = open_clip.get_tokenizer("ViT-B-32")            # the default SimpleTokenizer, context 77
    short = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return [(base, fast_tokenizer(base)), (short, fast_tokenizer(short))]


def test_fast_path_is_taken_only_for_the_default_tokenizer(tokenizers):
    for base, fast in tokenizers:
        assert isinstance(fast, WordMemoTokenizer) and fast.context_length == base.context_length
    canon = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    assert fast_tokenizer(canon) is canon                 # other cleaning: used as it is


def test_same_ids_as_open_clip(tokenizers, smoke_cfg):
    _, pairs = build_pairs(smoke_cfg)
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 '.,;:!?-()\"/#%$@*+=<>[]{}_~`|^\\"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    texts = pairs["caption"].tolist() + AWKWARD + fuzz
    for base, fast in tokenizers:
        expected = base(texts)
        assert torch.equal(fast(texts), expected)
        assert torch.equal(fast(texts), expected)        # from the memo, the second time
        assert torch.equal(fast("a red circle"), base("a red circle"))


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_opencv_decode_gives_pils_pixels():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    blobs = [_jpeg(smooth, quality=q, subsampling=s) for q in (50, 95) for s in (0, 2)]
    blobs.append(_jpeg(smooth[..., 0]))                  # grayscale JPEG -> three equal channels
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="PNG")      # PNG, and a size to resize
    blobs.append(buf.getvalue())
    big = np.kron(smooth, np.ones((2, 2, 1), np.uint8))[:80, :80]
    blobs.append(_jpeg(big))
    got = decode_images(blobs, 64)
    assert got.shape == (len(blobs), 3, 64, 64) and got.dtype == torch.uint8 and got.is_contiguous()
    for i, blob in enumerate(blobs[:-1]):
        assert torch.equal(got[i], decode_image(blob)), i
    assert torch.equal(got[-1], resize_uint8(decode_image(blobs[-1]), 64))   # 80 px: PIL's pixels, resized
    many = blobs * 20                                    # enough for the threaded path: same pixels, same order
    assert torch.get_num_threads() == 1 or len(many) >= 64
    assert torch.equal(decode_images(many, 64), got.repeat(20, 1, 1, 1))
    with pytest.raises(Exception):
        decode_images([b"not an image"], 64)
    with pytest.raises(Exception):
        decode_images(many[:40] + [b"not an image"] + many[:40], 64)   # raised from a decode thread too

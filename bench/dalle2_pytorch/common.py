"""What ours.py and theirs.py share (torch only, so both virtual environments import it): the
synthetic batches, the job's JSON, the thread setting and the timing of a training loop.

Both sides get inputs of the same shapes and distributions from the same seed: unit-norm CLIP
image and text embeddings [B, D], per-token caption encodings [B, L, W] zero past a random
caption length (DALLE2-pytorch derives its text mask from non-zero rows; ours takes the mask),
and random 8-bit images [B, 3, S, S].
"""
from __future__ import annotations

import json
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F


def job_from_argv() -> dict:
    """The job: one JSON object, the first command-line argument."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} '<json job>' (bench/dalle2_pytorch/compare.py writes it)")
    return json.loads(sys.argv[1])


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    torch.manual_seed(0)


def synthetic(n: int, shapes: dict, seed: int = 0) -> dict:
    """n rows: z_i, z_t [n, D] unit norm; tokens [n, L, W] (zero past each caption's length);
    mask [n, L] bool; images uint8 [n, 3, S, S] (S = shapes["image_size"])."""
    g = torch.Generator().manual_seed(seed)
    d, length, width, s = shapes["embed_dim"], shapes["context_length"], shapes["text_width"], shapes["image_size"]
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    tokens = torch.randn(n, length, width, generator=g) * mask[..., None]
    return {"n": n, "z_i": F.normalize(torch.randn(n, d, generator=g), dim=-1),
            "z_t": F.normalize(torch.randn(n, d, generator=g), dim=-1),
            "tokens": tokens, "mask": mask,
            "images": torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)}


def rows(data: dict, start: int, size: int) -> dict:
    """Rows [start, start + size) of every tensor of ``data``, wrapping around."""
    idx = torch.arange(start, start + size) % data["n"]
    return {k: v[idx] for k, v in data.items() if torch.is_tensor(v)}


def timed_steps(step: Callable[[int], None], warmup: int, steps: int) -> float:
    """Run ``step(i)`` warmup + steps times; seconds taken by the last ``steps``."""
    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return time.perf_counter() - t0


class RowCounter:
    """Counts the batch rows a network is evaluated on: divided by the number of samples, the
    network evaluations per sample (NFE), however a sampler batches guidance. Wraps the
    instance's ``forward`` (DALLE2-pytorch's guidance calls ``self.forward`` directly, past hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.rows, self.module, inner = 0, module, module.forward

        def counted(x, *args, **kwargs):
            self.rows += x.shape[0]
            return inner(x, *args, **kwargs)

        module.forward = counted

    def nfe(self, samples: int) -> float:
        return self.rows / samples

    def close(self) -> None:
        del self.module.forward


def timed_sampling(sample: Callable[[int], None], batch: int, counter: RowCounter) -> dict:
    """One untimed call on 1 row (first-call costs), then one timed call on ``batch`` rows."""
    sample(1)
    counter.rows = 0
    t0 = time.perf_counter()
    sample(batch)
    seconds = time.perf_counter() - t0
    return {"sample_batch": batch, "sample_s_per_item": seconds / batch, "nfe_per_item": counter.nfe(batch)}


def emit(result: dict) -> None:
    """The result, as the last line of stdout (compare.py reads that line)."""
    print(json.dumps(result), flush=True)

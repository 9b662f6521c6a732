"""The judge's network: a small convolutional classifier with one linear head per attribute.

Input uint8-range images mapped to [-1, 1] at the corpus's resolution (64 px), plus two
coordinate channels (CoordConv, Liu et al. 2018) so that positions and relations are easy to
read off. Four stride-2 stages take 64 px to 4 px; the 4x4 map is flattened (where things are
matters, so no global pooling) into a ``feature_dim`` vector, the features the Frechet
distance is measured in, and every head reads that vector.
"""
from __future__ import annotations

import torch
from torch import nn

from .labels import HEADS, VOCAB


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution, then one more 3x3 conv: [B, c_in, H, W] -> [B, c_out, H/2, W/2]."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    def __init__(self, image_size: int = 64, channels: tuple = (32, 64, 96, 128), feature_dim: int = 256):
        super().__init__()
        self.image_size = image_size
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)     # [1, 2, S, S]
        layers, c = [], 5
        for c_out in channels:
            layers.append(_stage(c, c_out))
            c = c_out
        self.body = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.Linear(feature_dim, sum(len(VOCAB[h]) for h in HEADS))
        self.sizes = [len(VOCAB[h]) for h in HEADS]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, S, S] in [-1, 1] -> features [B, feature_dim].

        The body runs channels-last (NHWC, the layout oneDNN's convolutions compute in, so no
        reorder around each of them): a training step 1.27-1.30x in bf16 on AMX and 1.17x in fp32 with
        oneDNN held to AVX2 (``python bench/paired_steps.py judge-nchw judge``); the features equal the
        NCHW ones up to rounding (2e-7)."""
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1).to(x.dtype)], dim=1)
        return self.features(self.body(x.contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (logits per head in ``HEADS`` order, each [B, classes]; features [B, feature_dim])."""
        f = self.embed(x)
        return list(torch.split(self.heads(f), self.sizes, dim=1)), f

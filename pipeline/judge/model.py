"""A trained judge at run time (evaluate, the benches, `unclip judge`): its directory ``models/judge``
loaded, reading uint8 images of any size into head outputs and features. Trained by
``pipeline.judge.stage``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .. import bundle
from ..images import resize, to_model
from .labels import HEADS
from .network import JudgeNet


class Judge:
    """A trained judge: ``predict`` uint8 images of any size -> head outputs and features."""

    def __init__(self, net: JudgeNet, meta: dict, device: torch.device):
        self.net, self.meta, self.device = net, meta, device

    @classmethod
    def load(cls, path: str | Path, device: Optional[str | torch.device] = None) -> "Judge":
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net, meta = bundle.load_model(Path(path), "judge", JudgeNet, dev)
        return cls(net, meta, dev)

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> tuple[list[dict[str, int]], torch.Tensor]:
        """uint8 [N, 3, H, W] (resized to the judge's resolution by ``images.resize``) ->
        (per image {head: class index}, features [N, feature_dim] float64 on the CPU)."""
        picks, feats = [], []
        for i in range(0, len(images), batch_size):
            x = resize(to_model(images[i:i + batch_size]), self.image_size).to(self.device)
            logits, f = self.net(x)
            picks.append(torch.stack([l.argmax(1) for l in logits], dim=1).cpu())
            feats.append(f.double().cpu())
        if not picks:
            return [], torch.empty(0, self.net.heads.in_features, dtype=torch.float64)
        rows = torch.cat(picks).tolist()
        return [dict(zip(HEADS, r)) for r in rows], torch.cat(feats)

"""The training loop shared by the pipeline's models: checkpoints, resume, guards, progress.

``fit`` runs ``loss_fn(model, batch)`` for a fixed number of optimizer steps. Checkpoints
(model, optimizer, scheduler, step) are written atomically every ``ckpt_every`` steps into a
directory keyed by a hash of the run's config; a run that was killed resumes from the last
one and ends at the same step count. A non-finite loss stops the run with a clear error instead
of training on into a NaN model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .progress import progress


class NonFiniteLoss(RuntimeError):
    pass


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, floor: float = 0.0):
    """Linear warmup to the base lr, then cosine decay to ``floor`` x base lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Checkpointer:
    """Atomic checkpoints in ``directory``; only a checkpoint of the same config is resumed."""
    directory: Path
    key: str                     # config hash: a changed config never resumes a stale run
    every: int

    @property
    def path(self) -> Path:
        return Path(self.directory) / f"{self.key}.pt"

    def save(self, step: int, model, optimizer, scheduler, extra: Optional[dict] = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None, "extra": extra or {}}, tmp)
        os.replace(tmp, self.path)

    def load(self, model, optimizer, scheduler) -> tuple[int, dict]:
        if not self.path.exists():
            return 0, {}
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler and state["scheduler"]:
            scheduler.load_state_dict(state["scheduler"])
        return int(state["step"]), state["extra"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def fit(model: torch.nn.Module, optimizer, scheduler, batches: Iterable, loss_fn: Callable, *, steps: int,
        checkpointer: Optional[Checkpointer] = None, grad_clip: Optional[float] = None, desc: str = "train",
        log_every: int = 10, on_log: Optional[Callable[[int, dict], None]] = None,
        after_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train to ``steps`` optimizer steps (resuming if a checkpoint exists). Returns a summary."""
    start = 0
    if checkpointer:
        start, _ = checkpointer.load(model, optimizer, scheduler)
        if start:
            print(f"[{desc}] resuming from checkpoint at step {start}/{steps}", flush=True)
    model.train()
    it = iter(batches)
    bar = progress(total=steps, desc=desc, unit="step")
    bar.update(start)
    t0, losses, last = time.perf_counter(), [], float("nan")
    for step in range(start, steps):
        batch = next(it)
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"[{desc}] loss is {loss.item()} at step {step}: stopping instead of "
                                f"training a NaN model (lower the learning rate or check the inputs); "
                                f"the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler:
            scheduler.step()
        if after_step:
            after_step(step + 1)
        last = loss.item()
        losses.append(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
        if on_log and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(step + 1, {"loss": sum(losses[-log_every:]) / len(losses[-log_every:]),
                              "lr": optimizer.param_groups[0]["lr"]})
        if checkpointer and ((step + 1) % checkpointer.every == 0) and step + 1 < steps:
            checkpointer.save(step + 1, model, optimizer, scheduler)
    bar.close()
    elapsed = time.perf_counter() - t0
    ran = steps - start
    return {"steps": steps, "resumed_from": start, "final_loss": round(last, 5),
            "train_seconds": round(elapsed, 1), "steps_per_s": round(ran / elapsed, 3) if elapsed > 0 else None}

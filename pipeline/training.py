"""The training loop shared by the pipeline's models: checkpoints, resume, guards, progress.

``fit`` runs ``loss_fn(model, batch)`` for a fixed number of optimizer steps. Checkpoints
(model, optimizer, scheduler, step) are written atomically every ``ckpt_every`` steps into a
directory keyed by a hash of the run's config; a run that was killed resumes from the last
one and ends at the same step count. A non-finite loss stops the run with a clear error instead
of training on into a NaN model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware has it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return native_cpu_bf16()


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively. oneDNN's own check is true on every AVX512 CPU,
    where bf16 is emulated: there a CLIP step of batch 256 took 1.18 s under bf16 autocast
    against 0.53 s in fp32 (measured on a 2-core AVX512 machine without AVX512-BF16 or AMX)."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())      # Arm: bf16 where oneDNN has it


def attention_kernel(device: torch.device):
    """On CPU, the plain math attention: for short sequences PyTorch's CPU flash attention
    backward is the slowest op of a step (CLIP, measured: 0.41 -> 0.23 s/step, batch 256)."""
    if device.type == "cpu":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@contextlib.contextmanager
def autocast(precision: str, device: torch.device):
    """The forward pass's precision context: bf16 autocast where native, math attention on CPU."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device)), \
            attention_kernel(device):
        yield


def make_accelerator():
    """An accelerate ``Accelerator`` for whatever launched us: one CPU or GPU process, or one of
    several under ``accelerate launch`` / ``torchrun`` (DDP; gloo across CPU processes).
    Mixed precision stays with the models' own bf16 autocast (:func:`autocast`)."""
    from accelerate import Accelerator
    return Accelerator(cpu=not torch.cuda.is_available())


def fit(model: torch.nn.Module, optimizer, scheduler, batches: Iterable, loss_fn: Callable, *, steps: int,
        checkpointer: Optional[Checkpointer] = None, grad_clip: Optional[float] = None, desc: str = "train",
        log_every: int = 10, on_log: Optional[Callable[[int, dict], None]] = None,
        after_step: Optional[Callable[[int], None]] = None, ema=None, accelerator=None,
        on_nonfinite: str = "stop", max_skipped: int = 20) -> dict:
    """Train to ``steps`` optimizer steps (resuming if a checkpoint exists). Returns a summary.

    ``ema``: a diffusers ``EMAModel`` over ``model``'s parameters, updated after every step and
    checkpointed with it. ``accelerator``: run under accelerate (several processes: each gets
    its own ``batches``, gradients are averaged, the main process checkpoints and reports).
    ``on_nonfinite``: "stop" raises :class:`NonFiniteLoss`; "skip" drops the step (no update,
    counted in the summary) and stops only after ``max_skipped`` of them.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    start = 0
    if checkpointer:
        start, extra = checkpointer.load(model, optimizer, scheduler)
        if ema is not None and extra.get("ema"):
            ema.load_state_dict(extra["ema"])
        if start:
            print(f"[{desc}] resuming from checkpoint at step {start}/{steps}", flush=True)
    main = accelerator is None or accelerator.is_main_process
    train_model = model
    if accelerator is not None:
        train_model, optimizer = accelerator.prepare(model, optimizer)
    train_model.train()
    it = iter(batches)
    bar = progress(total=steps, desc=desc, unit="step", disable=not main)
    bar.update(start)
    t0, losses, last, skipped = time.perf_counter(), [], float("nan"), 0
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(start, steps):
        batch = next(it)
        loss = loss_fn(train_model, batch)
        bad = not bool(torch.isfinite(loss.detach()))
        if accelerator is not None and accelerator.num_processes > 1:
            # every process must take the same decision, or DDP's gradient all-reduce hangs
            bad = bool(accelerator.reduce(torch.tensor(float(bad), device=loss.device), "sum") > 0)
        optimizer.zero_grad(set_to_none=True)
        if not bad:
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            if grad_clip:
                norm = (accelerator.clip_grad_norm_(params, grad_clip) if accelerator is not None
                        else torch.nn.utils.clip_grad_norm_(params, grad_clip))
                bad = not bool(torch.isfinite(norm))       # all-reduced grads: same on every process
        if bad:
            if on_nonfinite == "stop" or skipped >= max_skipped:
                why = "stopping" if on_nonfinite == "stop" else f"{skipped} steps already skipped, stopping"
                raise NonFiniteLoss(f"[{desc}] loss is {loss.item()} at step {step}: {why} instead of "
                                    f"training a NaN model (lower the learning rate or check the inputs); "
                                    f"the last good checkpoint is kept")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            if ema is not None:
                ema.step(params)
            last = loss.item()
            losses.append(last)
        if scheduler:
            scheduler.step()
        if after_step:
            after_step(step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
        if main and on_log and losses and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(step + 1, {"loss": sum(losses[-log_every:]) / len(losses[-log_every:]),
                              "lr": optimizer.param_groups[0]["lr"]})
        if checkpointer and ((step + 1) % checkpointer.every == 0) and step + 1 < steps:
            if main:
                checkpointer.save(step + 1, model, optimizer, scheduler,
                                  {"ema": ema.state_dict()} if ema is not None else None)
            if accelerator is not None:
                accelerator.wait_for_everyone()
    bar.close()
    train_model.eval()
    elapsed = time.perf_counter() - t0
    ran = steps - start
    return {"steps": steps, "resumed_from": start, "final_loss": round(last, 5), "skipped_steps": skipped,
            "processes": accelerator.num_processes if accelerator is not None else 1,
            "train_seconds": round(elapsed, 1), "steps_per_s": round(ran / elapsed, 3) if elapsed > 0 else None}


def train_diffusion_model(model: torch.nn.Module, tc, make_batches: Callable[[int, int], Iterable],
                          loss_fn: Callable, *, checkpoint_dir: Path, key: Any, desc: str,
                          on_log: Optional[Callable[[int, dict], None]] = None, warm=None) -> tuple[dict, Any]:
    """The recipe the prior, decoder and upsamplers share, from their ``TrainConfig`` ``tc``:
    AdamW, linear warmup + cosine decay, EMA weights (``tc.ema_decay``), checkpoints keyed by
    ``key`` (the config that must match to resume), gradient clipping, non-finite policy, run
    under accelerate. ``make_batches(rank, world)`` gives this process's batch stream.

    ``warm``: a :class:`pipeline.retrain.WarmStart`: start from its weights (the last run's EMA
    weights) and train its (fewer) steps with its warmup, on the same schedule's shape.

    On return ``model`` holds the EMA weights (what sampling uses). Returns (summary, accelerator).
    """
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file

    if warm is not None:
        model.load_state_dict(load_file(str(warm.weights)))       # strict: same architecture
        tc = tc.model_copy(update={"steps": warm.steps, "warmup_steps": warm.warmup_steps})
        key = {"run": key, "continued_from": warm.sha256, "steps": warm.steps}
        print(f"[{desc}] continuing: {warm.why}", flush=True)
    accelerator = make_accelerator()
    model.to(accelerator.device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, fused=True)
    scheduler = cosine_with_warmup(optimizer, tc.warmup_steps, tc.steps, floor=0.1)
    ema = EMAModel(model.parameters(), decay=tc.ema_decay)
    ckpt = Checkpointer(checkpoint_dir, config_hash(key), every=tc.checkpoint_every)
    summary = fit(model, optimizer, scheduler, make_batches(accelerator.process_index, accelerator.num_processes),
                  loss_fn, steps=tc.steps, checkpointer=ckpt, grad_clip=tc.grad_clip, desc=desc, on_log=on_log,
                  ema=ema, accelerator=accelerator, on_nonfinite=tc.on_nonfinite)
    if accelerator.is_main_process:
        ckpt.clear()
    ema.copy_to(model.parameters())
    model.eval()
    return summary, accelerator

"""The training loop shared by the pipeline's models: checkpoints, resume, guards, progress.

``fit`` runs ``loss_fn(model, batch)`` for a fixed number of optimizer steps. Checkpoints
(model, optimizer, scheduler, step) are written atomically (fsynced, then renamed) every
``ckpt_every`` steps and after the last one, into a directory keyed by a hash of what the run
depends on (its config, and the stages add their data's shard digests and the CLIP's sha256);
a run that was killed resumes from the last one and ends at the same step count. The stage
clears its checkpoints (:func:`clear_checkpoints`) only once its output is committed, so a kill
during validation or saving loses no training. Checkpoints load with ``weights_only=True`` (no
pickled code); one that does not load is set aside (``.corrupt-*``) and the run starts over. A
non-finite loss stops the run with a clear error instead of training on into a NaN model.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import io
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import storage, threads
from .device import machine_signature, native_cpu_bf16, resolved_precision
from .progress import progress
from .workspace import fsync_dir, kill_point, pid_alive


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
    def path(self):
        return self.directory / f"{self.key}.pt" if is_url(self.directory) else Path(self.directory) / f"{self.key}.pt"

    def save(self, step: int, model, optimizer, scheduler, extra: Optional[dict] = None) -> None:
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler else None, "extra": extra or {}}
        if is_url(self.directory):               # an object store: one PUT (or a write and a move)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            kill_point("checkpoint")
            storage.write_url(self.path, buffer.getvalue())
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())           # the bytes on disk before the name: no empty checkpoint after a crash
            kill_point("checkpoint")
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)         # a full disk leaves no partial file behind
            raise
        fsync_dir(self.path.parent)

    def load(self, model, optimizer, scheduler) -> tuple[int, dict]:
        """(step, extra) of this key's checkpoint, loaded into the objects; (0, {}) when there
        is none, or when it does not load (truncated, corrupt, holding more than tensors and
        plain data): that one is set aside, named in a message, and the run starts over."""
        sweep_temporaries(self.directory)
        source = self.read()
        if source is None:
            return 0, {}
        try:
            # weights_only: tensors, numbers, strings and containers, never pickled code (a checkpoint
            # directory can be written by others: a shared or restored workspace)
            state = torch.load(source, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler and state["scheduler"]:
                scheduler.load_state_dict(state["scheduler"])
            return int(state["step"]), state["extra"]
        except Exception as err:  # noqa: BLE001 -- any checkpoint that does not load is unusable
            aside = f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            if is_url(self.directory):
                storage.move_url(self.path, self.directory / aside)
            else:
                os.replace(self.path, self.path.with_name(aside))
            print(f"checkpoint {self.path} does not load ({type(err).__name__}: {str(err)[:300]}); "
                  f"moved aside to {aside}, training starts over", flush=True)
            return 0, {}

    def read(self):
        """What torch.load reads: the local path, the stored bytes, or None when there is none."""
        if is_url(self.directory):
            data = storage.read_url(self.path)
            return None if data is None else io.BytesIO(data)
        return self.path if self.path.exists() else None

    def clear(self) -> None:
        if is_url(self.directory):
            storage.remove_urls(self.directory, (self.path.name,))
        else:
            self.path.unlink(missing_ok=True)


def is_url(directory) -> bool:
    return isinstance(directory, storage.Url)


def clear_checkpoints(directory: Path) -> None:
    """A stage's checkpoints, once its output is committed: every key's (an earlier config's
    are stale now) and any temporary file; a set-aside ``.corrupt-*`` one is kept for a look."""
    if is_url(directory):
        storage.remove_urls(directory, (".pt",))
        return
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.is_file() and (p.suffix == ".pt" or ".tmp" in p.suffix):
                p.unlink(missing_ok=True)


def sweep_temporaries(directory: Path) -> None:
    """Remove ``<key>.tmp<pid>`` files of processes that are gone (killed during a save); an
    object store has none (a PUT is whole or absent; storage.write_object cleans up its own)."""
    if is_url(directory):
        return
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob("*.tmp*"):
        pid = p.suffix.removeprefix(".tmp")
        if pid.isdigit() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def precision_cache_path(checkpoint_dir) -> Path:
    """Where a stage keeps its precision measurement: beside its checkpoints, or, when they are in
    an object store, in the workspace (torchrun workers run there: pipeline/launch.py)."""
    if is_url(checkpoint_dir):
        return Path.cwd() / ".unclip" / "checkpoints" / "precision.json"
    return Path(checkpoint_dir).parent / "precision.json"


def choose_precision(precision: str, model: torch.nn.Module, loss_fn: Callable, batch, *, key: Any,
                     cache: Optional[Path] = None, repeats: int = 3) -> dict:
    """Resolve ``precision`` for training ``model``: "bf16"/"fp32" as given; "auto": fp32 where the
    hardware has no native bf16, else the faster of the two measured on the stage's own step.

    Whether bf16 pays is a measurement, not a flag: on CPUs with AVX512-BF16 but no AMX, autocast's
    casts can cost more than the matmuls save for small networks. The step (forward, loss and
    backward on ``batch``, on a copy of the model, with the RNG state restored afterwards, so the
    run that follows is the same whether the timing ran or came from the cache) is timed
    ``repeats`` times per precision, interleaved, after one warm-up each; the median decides.
    The result is cached in ``cache`` (a JSON file) under the machine and ``key`` (the model's
    config and batch size). Returns {"choice", "why", and the timings "bf16_s", "fp32_s"}."""
    device = next(model.parameters()).device
    if precision != "auto":
        return {"choice": precision, "why": "set in params.yaml"}
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else native_cpu_bf16()
    if not native:
        return {"choice": "fp32", "why": "no native bf16 on this machine (emulated bf16 is slower)"}
    entry = f"{machine_signature(device)} | {config_hash(key)}"
    store = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if entry in store:
        return store[entry] | {"cached": True}
    probe = copy.deepcopy(model).train()
    times: dict[str, list[float]] = {"bf16": [], "fp32": []}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for rep in range(repeats + 1):
            for choice in times:
                with resolved_precision(choice):
                    t0 = time.perf_counter()
                    loss_fn(probe, batch).backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep:                                  # the first round warms up
                        times[choice].append(time.perf_counter() - t0)
                probe.zero_grad(set_to_none=True)
    med = {c: statistics.median(t) for c, t in times.items()}
    choice = min(med, key=med.get)
    result = {"choice": choice, "why": f"measured: forward+backward {med['bf16']:.3f} s in bf16, "
                                       f"{med['fp32']:.3f} s in fp32", "bf16_s": round(med["bf16"], 4),
              "fp32_s": round(med["fp32"], 4)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(store | {entry: result}, indent=1))
        os.replace(tmp, cache)
    return result | {"cached": False}


def make_accelerator():
    """An accelerate ``Accelerator`` for whatever launched us: one CPU or GPU process, or one of
    several under ``accelerate launch`` / ``torchrun`` (DDP; gloo across CPU processes).
    Mixed precision stays with the models' own bf16 autocast (:func:`pipeline.device.autocast`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    # set by a torchrun launch (pipeline/launch.py) from cluster.train: backend and collective timeout
    backend = os.environ.get("UNCLIP_DIST_BACKEND", "auto")
    kwargs = [InitProcessGroupKwargs(backend=None if backend == "auto" else backend,
                                     timeout=datetime.timedelta(seconds=int(os.environ["UNCLIP_DIST_TIMEOUT_S"])))
              ] if "UNCLIP_DIST_TIMEOUT_S" in os.environ else []
    # diffusers' PriorTransformer holds parameters a step may not use (DDP's reducer then stops at
    # the second step: "Expected to have finished reduction in the prior iteration")
    kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=kwargs)


def fit(model: torch.nn.Module, optimizer, scheduler, batches: Iterable, loss_fn: Callable, *, steps: int,
        checkpointer: Optional[Checkpointer] = None, grad_clip: Optional[float] = None, desc: str = "train",
        log_every: int = 10, on_log: Optional[Callable[[int, dict], None]] = None,
        after_step: Optional[Callable[[int], None]] = None, ema=None, accelerator=None,
        on_nonfinite: str = "stop", max_skipped: int = 20, precision: Optional[str] = None,
        precision_cache: Optional[Path] = None) -> dict:
    """Train to ``steps`` optimizer steps (resuming if a checkpoint exists). Returns a summary.

    ``after_step(n)``: called after each step with the steps taken so far (and once with the
    checkpoint's step when a run resumes). ``ema``: a diffusers ``EMAModel`` over ``model``'s
    parameters, updated after every step and checkpointed with it. ``accelerator``: run under
    accelerate (several processes: each gets its own ``batches``, gradients are averaged, the main
    process checkpoints and reports).
    ``on_nonfinite``: "stop" raises :class:`NonFiniteLoss`; "skip" drops the step (no update,
    counted in the summary) and stops only after ``max_skipped`` of them.
    ``precision``: the config's setting, which ``loss_fn`` passes to :func:`autocast`; "auto" is
    resolved by timing the step itself on the first batch (:func:`choose_precision`, cached in
    ``precision_cache``) and the summary says what was chosen and why.
    """
    it = iter(batches)
    chosen = None
    if precision is not None:
        first = next(it)
        chosen = choose_precision(precision, model, loss_fn, first, cache=precision_cache,
                                  key={"desc": desc, "params": sum(p.numel() for p in model.parameters()),
                                       "shapes": _shapes(first)})
        it = itertools.chain([first], it)
        print(f"[{desc}] precision {chosen['choice']}: {chosen['why']}", flush=True)
    with resolved_precision(chosen["choice"] if chosen else None):
        summary = _fit(model, optimizer, scheduler, it, loss_fn, steps=steps, checkpointer=checkpointer,
                       grad_clip=grad_clip, desc=desc, log_every=log_every, on_log=on_log, after_step=after_step,
                       ema=ema, accelerator=accelerator, on_nonfinite=on_nonfinite, max_skipped=max_skipped)
    kill_point("validation")                  # what every stage does next
    return summary | ({"precision": chosen} if chosen else {})


def _shapes(batch) -> Any:
    """The tensor shapes of a batch (a tensor, or a tuple/list/dict of them): part of a timing's key."""
    if isinstance(batch, torch.Tensor):
        return list(batch.shape)
    if isinstance(batch, dict):
        return {k: _shapes(v) for k, v in batch.items() if isinstance(v, (torch.Tensor, dict, list, tuple))}
    if isinstance(batch, (list, tuple)):
        return [_shapes(v) for v in batch if isinstance(v, (torch.Tensor, dict, list, tuple))]
    return None


def _fit(model, optimizer, scheduler, it, loss_fn, *, steps, checkpointer, grad_clip, desc, log_every, on_log,
         after_step, ema, accelerator, on_nonfinite, max_skipped) -> dict:
    """:func:`fit`'s loop over the batch iterator ``it``."""
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    start, last = _resume(checkpointer, model, optimizer, scheduler, ema, desc, steps)
    if start and after_step:
        after_step(start)           # a resumed run has taken ``start`` steps: what depends on the step sees it
    main = accelerator is None or accelerator.is_main_process
    train_model = model
    if accelerator is not None:
        train_model, optimizer = accelerator.prepare(model, optimizer)
    train_model.train()
    bar = progress(total=steps, desc=desc, unit="step", disable=not main)
    bar.update(start)
    t0, losses, skipped, clipped = time.perf_counter(), [], 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    thread_history = threads.History(start)
    for step in range(start, steps):
        thread_history.follow(step)     # a stage running beside this one ended: take its cores back (one stat)
        batch = next(it)
        loss = loss_fn(train_model, batch)
        bad, norm = _backward(loss, optimizer, params, grad_clip, accelerator)
        clipped += bool(grad_clip) and not bad and norm > grad_clip
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
        # Also after the last step: the stage validates and saves after training, and a kill
        # there must not cost the training (the stage clears the checkpoint once it has saved).
        if checkpointer and ((step + 1) % checkpointer.every == 0 or step + 1 == steps):
            _save(checkpointer, step + 1, model, optimizer, scheduler, ema, last, main, accelerator)
        kill_point("step", step + 1)
    bar.close()
    train_model.eval()
    elapsed = time.perf_counter() - t0
    ran = steps - start
    return {"steps": steps, "resumed_from": start, "final_loss": round(last, 5), "skipped_steps": skipped,
            "clipped_steps": clipped,
            "processes": accelerator.num_processes if accelerator is not None else 1, "threads": thread_history.steps,
            "train_seconds": round(elapsed, 1), "steps_per_s": round(ran / elapsed, 3) if elapsed > 0 else None}


def _foreach(params: list) -> bool:
    """Whether gradient clipping can use multi-tensor (foreach) kernels for ``params``: one norm
    over all gradients instead of one per tensor (1.7-2.1 against 2.8 ms a step for the decoder's
    336 tensors on 2 CPU cores); torch has them for CPU and CUDA tensors."""
    return all(p.device.type in ("cpu", "cuda") for p in params)


def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=...)``, bit for bit, without its
    multiply of every gradient when nothing is clipped. Returns the total norm (a 0-dim tensor).

    torch multiplies every gradient by ``min(1, max_norm / (norm + 1e-6))`` on every step, so as
    not to read the norm back to the host; on a CPU that read costs nothing, and a multiply by
    exactly 1.0 is a pass over every gradient (the decoder's 336 tensors) for nothing on most steps."""
    foreach = _foreach(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=foreach)
    if float(norm) + 1e-6 > max_norm:           # torch's coefficient max_norm / (norm + 1e-6) is below 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=foreach)
    return norm


def _resume(checkpointer, model, optimizer, scheduler, ema, desc: str, steps: int) -> tuple[int, float]:
    """The step to start from and the last loss: the checkpoint's, if there is one (weights,
    optimizer, scheduler and EMA restored into the objects given), else 0 and NaN."""
    start, last = 0, float("nan")
    if checkpointer:
        start, extra = checkpointer.load(model, optimizer, scheduler)
        if ema is not None and extra.get("ema"):
            ema.load_state_dict(extra["ema"])
        last = float(extra.get("last_loss", last))
        if start:
            print(f"[{desc}] resuming from checkpoint at step {start}/{steps}", flush=True)
    return start, last


def _backward(loss: torch.Tensor, optimizer, params: list, grad_clip, accelerator) -> tuple[bool, float]:
    """Zero the gradients, then backward and clip unless the loss is not finite. Returns (bad,
    the gradient norm before clipping: NaN when not clipped); bad is True when the step must not
    be taken (the loss or the gradient norm is not finite, on any process)."""
    norm = float("nan")
    bad = not bool(torch.isfinite(loss.detach()))
    if accelerator is not None and accelerator.num_processes > 1:
        # every process must take the same decision, or DDP's gradient all-reduce hangs
        bad = bool(accelerator.reduce(torch.tensor(float(bad), device=loss.device), "sum") > 0)
    optimizer.zero_grad(set_to_none=True)
    if not bad:
        accelerator.backward(loss) if accelerator is not None else loss.backward()
        if grad_clip:
            norm = float(accelerator.clip_grad_norm_(params, grad_clip) if accelerator is not None
                         else clip_gradients(params, grad_clip))
            bad = not math.isfinite(norm)              # all-reduced grads: same on every process
    return bad, norm


def _save(checkpointer, step: int, model, optimizer, scheduler, ema, last: float, main: bool, accelerator) -> None:
    """A checkpoint at ``step`` (written by the main process; the others wait for it)."""
    if main:
        checkpointer.save(step, model, optimizer, scheduler,
                          {"last_loss": last, **({"ema": ema.state_dict()} if ema is not None else {})})
    if accelerator is not None:
        accelerator.wait_for_everyone()


def ema_model(parameters, decay: float):
    """An EMA of ``parameters``: diffusers' ``EMAModel`` (its decay warmup, state_dict, ``copy_to``)
    whose update is one multi-tensor lerp per step, shadow <- shadow + (1 - decay) (param - shadow).

    Why not diffusers' own: its ``foreach`` update is a ``_foreach_sub`` into temporaries, then a
    ``_foreach_sub_`` with ``alpha``, and on a CPU foreach ops run tensor by tensor: three ops and
    a temporary per tensor where a lerp is one (docs/MEASURED.md "the update's fixed cost"). The shadow
    weights equal diffusers' within float rounding (tests/test_training.py)."""
    from diffusers.training_utils import EMAModel

    class LerpEMA(EMAModel):
        @torch.no_grad()
        def step(self, parameters):
            parameters = list(parameters)
            self.optimization_step += 1
            self.cur_decay_value = decay_now = self.get_decay(self.optimization_step)
            trained, frozen = [], []                 # (shadow, param) pairs; no_grad: no detach needed
            for pair in zip(self.shadow_params, parameters):
                (trained if pair[1].requires_grad else frozen).append(pair)
            if frozen:
                torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
            if trained:
                torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1.0 - decay_now)

    return LerpEMA(parameters, decay=decay, foreach=True)


def build_optimizer(model: torch.nn.Module, tc):
    """The diffusion models' optimizer, lr schedule and EMA from their ``TrainConfig`` ``tc``:
    fused AdamW (no decay on biases and norms), linear warmup + cosine decay to 0.1 x lr, and
    an EMA of the weights (:func:`ema_model`). The EMA, like the optimizer, is a fixed cost of
    every step (docs/MEASURED.md "the decoder's fixed cost")."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, fused=True)
    scheduler = cosine_with_warmup(optimizer, tc.warmup_steps, tc.steps, floor=0.1)
    ema = ema_model(model.parameters(), decay=tc.ema_decay)
    return optimizer, scheduler, ema


def train_diffusion_model(model: torch.nn.Module, tc, make_batches: Callable[[int, int], Iterable],
                          loss_fn: Callable, *, checkpoint_dir: Path, key: Any, desc: str,
                          on_log: Optional[Callable[[int, dict], None]] = None, warm=None) -> tuple[dict, Any]:
    """The recipe the prior, decoder and upsamplers share, from their ``TrainConfig`` ``tc``:
    AdamW, linear warmup + cosine decay, EMA weights (``tc.ema_decay``), checkpoints keyed by
    ``key`` (the config that must match to resume), gradient clipping, non-finite policy, run
    under accelerate. ``make_batches(rank, world)`` gives this process's batch stream. The
    checkpoint stays in ``checkpoint_dir`` until the stage calls :func:`clear_checkpoints`.

    ``warm``: a :class:`pipeline.retrain.WarmStart`: start from its weights (the last run's EMA
    weights) and train its (fewer) steps with its warmup, on the same schedule's shape.

    On return ``model`` holds the EMA weights (what sampling uses). Returns (summary, accelerator).
    """
    from safetensors.torch import load_file

    if warm is not None:
        model.load_state_dict(load_file(str(warm.weights)))       # strict: same architecture
        tc = tc.model_copy(update={"steps": warm.steps, "warmup_steps": warm.warmup_steps})
        key = {"run": key, "continued_from": warm.sha256, "steps": warm.steps}
        print(f"[{desc}] continuing: {warm.why}", flush=True)
    accelerator = make_accelerator()
    model.to(accelerator.device)
    optimizer, scheduler, ema = build_optimizer(model, tc)
    ckpt = Checkpointer(checkpoint_dir, config_hash(key), every=tc.checkpoint_every)
    summary = fit(model, optimizer, scheduler, make_batches(accelerator.process_index, accelerator.num_processes),
                  loss_fn, steps=tc.steps, checkpointer=ckpt, grad_clip=tc.grad_clip, desc=desc, on_log=on_log,
                  ema=ema, accelerator=accelerator, on_nonfinite=tc.on_nonfinite, precision=tc.precision,
                  precision_cache=precision_cache_path(checkpoint_dir))
    ema.copy_to(model.parameters())
    model.eval()
    # what replicas compare (pipeline/launch.py): every rank of a DDP run ends with these weights
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return summary | {"weights_sha256": digest.hexdigest()}, accelerator

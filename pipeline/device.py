"""Where and in which precision the networks run: the device, bf16 autocast where the hardware
has it natively (or where the training loop measured it pays: ``training.choose_precision``), and
the attention kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
import platform
from typing import Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def device_of(explicit: Optional[str] = None) -> torch.device:
    if explicit:
        return torch.device(explicit)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# What "auto" resolved to for the training loop running in this context (set by ``measured_precision``)
_AUTO = contextvars.ContextVar("unclip_auto_precision", default=None)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16. "bf16"/"fp32" as given. "auto": inside a training loop, what
    :func:`choose_precision` measured for it; elsewhere (sampling), bf16 where the hardware has it
    natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    if precision != "auto":
        return precision == "bf16"
    if _AUTO.get() is not None:
        return _AUTO.get() == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return native_cpu_bf16()


@contextlib.contextmanager
def resolved_precision(choice: Optional[str]):
    """Within this context ``precision: auto`` means ``choice`` ("bf16" or "fp32"; None: the flags)."""
    token = _AUTO.set(choice)
    try:
        yield
    finally:
        _AUTO.reset(token)


def machine_signature(device: torch.device) -> str:
    """What a precision timing depends on besides the model: the processor, threads and torch."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = platform.processor() or platform.machine()
        try:
            chip = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{chip} | {device.type} | threads {torch.get_num_threads()} | torch {torch.__version__}"


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

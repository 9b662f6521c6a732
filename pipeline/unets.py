"""Settings shared by the UNets of the decoder and the upsamplers (diffusers' UNet2DConditionModel
and UNet2DModel), where diffusers' defaults or argument names would silently build something else
than asked for.
"""
from __future__ import annotations

import math


def norm_groups(channels: list[int], most: int = 32, least_size: int = 4) -> int:
    """GroupNorm's group count: the largest <= ``most`` that divides every channel count and
    leaves at least ``least_size`` channels per group where it can. With one channel per group
    (32 groups of a 32-channel level) GroupNorm becomes instance norm, which erases each
    channel's mean over the image, and with it the flat colour of a background. Measured on
    upsampler 1 (16 -> 32 px, 400 steps): val PSNR 22.0 dB with 32 groups, 29.0 dB with 8."""
    common = math.gcd(*channels)
    fits = [g for g in range(1, min(most, common) + 1) if common % g == 0]
    return max([g for g in fits if common // g >= least_size] or [1])


def heads_per_level(channels: list[int], head_dim: int) -> tuple[int, ...]:
    """The number of attention heads of each level for heads of ``head_dim`` dimensions.

    UNet2DConditionModel reads its ``attention_head_dim`` argument as the number of heads (a
    naming bug it keeps for old configs: diffusers issue 2011), so ``attention_head_dim=32``
    on a 128-channel level builds 32 heads of 4 dimensions. Pass this tuple there instead."""
    return tuple(max(1, c // head_dim) for c in channels)

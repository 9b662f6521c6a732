"""The upsampler's network: a convolutional UNet (diffusers' UNet2DModel) without attention.

DALL-E 2 (section 2 and appendix C): the upsamplers are ADM UNets conditioned only on the
low-resolution image, with no attention layers, so they are fully convolutional: trained on
crops of the high-res image, applied at full size. The low-res image, upsampled bicubically
to the output size, is concatenated with the noised image as extra input channels (SR3's
conditioning, Saharia et al. 2021). No caption or CLIP embedding reaches this network.
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from torch import nn


def norm_groups(channels: list[int], most: int = 32, least_size: int = 4) -> int:
    """GroupNorm's group count: the largest <= ``most`` that divides every channel count and
    leaves at least ``least_size`` channels per group where it can. With one channel per group
    (32 groups of a 32-channel level) GroupNorm becomes instance norm, which erases each
    channel's mean over the image, and with it the flat colour of a background. Measured on
    upsampler 1 (16 -> 32 px, 400 steps): val PSNR 22.0 dB with 32 groups, 29.0 dB with 8."""
    common = math.gcd(*channels)
    fits = [g for g in range(1, min(most, common) + 1) if common % g == 0]
    return max([g for g in fits if common // g >= least_size] or [1])


class Upsampler(nn.Module):
    """``forward(x_t, t, low_res_up)``: the noised high-res image and the conditioning image
    (both [B, 3, H, W], H and W multiples of :attr:`multiple`) -> the prediction [B, 3, H, W]
    (noise or v, as the model was trained). Constructor arguments are saved as the bundle's
    ``arch`` and rebuild it."""

    def __init__(self, block_out_channels: list[int], layers_per_block: int = 1):
        super().__init__()
        levels = len(block_out_channels)
        self.multiple = 2 ** (levels - 1)          # each level but the last halves the resolution
        self.unet = UNet2DModel(
            in_channels=6, out_channels=3, block_out_channels=tuple(block_out_channels),
            down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
            layers_per_block=layers_per_block, add_attention=False,       # no attention in the mid block either
            norm_num_groups=norm_groups(list(block_out_channels)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_res_up: torch.Tensor) -> torch.Tensor:
        """x_t [B, 3, H, W], t [B] long timesteps, low_res_up [B, 3, H, W] -> [B, 3, H, W]."""
        return self.unet(torch.cat([x_t, low_res_up], dim=1), t, return_dict=False)[0]

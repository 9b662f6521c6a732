"""The upsampler's network: a convolutional UNet (diffusers' UNet2DModel) without attention.

DALL-E 2 (section 2 and appendix C): the upsamplers are ADM UNets conditioned only on the
low-resolution image, with no attention layers, so they are fully convolutional: trained on
crops of the high-res image, applied at full size. The low-res image, upsampled bicubically
to the output size, is concatenated with the noised image as extra input channels (SR3's
conditioning, Saharia et al. 2021). No caption reaches this network.

A declared deviation, off by default (``embed_dim`` > 0, ``upsample.stages.<k>.condition:
image_embed``): the CLIP image embedding z_i, projected and added to the timestep embedding as
the decoder's UNet does. The paper's 64 px base keeps an object's shape; a 16 px base does not
(a small square is 4 px across), so an upsampler that sees only pixels cannot restore it.

Noise conditioning augmentation (``noise_aug``; Ho et al. 2021, "Cascaded Diffusion Models",
section 3.2; Imagen's "noise conditioning augmentation"): in training the low-res image gets
Gaussian noise of a random level, and the network is told the level (``aug_level``, 8-bit levels,
embedded as a timestep is and added to the time embedding). At sampling the previous model's
output can be noised to a chosen level (``sampling.aug_level``). Measured on the first upsampler
(docs/MEASURED.md, 2026-12-04 fifth session), the gain comes from the training alone: sampled at level 0,
it copies less of the decoder's background errors (the cascade's background noise 4.43 -> 2.96
levels); every level above 0 at sampling adds noise instead of removing it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..unets import norm_groups

AUG_EMBED_SCALE = 1000 / 32     # aug levels (8-bit levels, 0-32) -> the sinusoid's timestep range (0-1000)


class Upsampler(nn.Module):
    """``forward(x_t, t, low_res_up)``: the noised high-res image and the conditioning image
    (both [B, 3, H, W], H and W multiples of :attr:`multiple`) -> the prediction [B, 3, H, W]
    (noise or v, as the model was trained). Constructor arguments are saved as model.json's
    ``arch`` and rebuild it."""

    def __init__(self, block_out_channels: list[int], layers_per_block: int = 1, embed_dim: int = 0,
                 noise_aug: bool = False):
        super().__init__()
        levels = len(block_out_channels)
        self.multiple = 2 ** (levels - 1)          # each level but the last halves the resolution
        self.embed_dim = embed_dim
        self.noise_aug = noise_aug
        self.unet = UNet2DModel(
            in_channels=6, out_channels=3, block_out_channels=tuple(block_out_channels),
            down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
            layers_per_block=layers_per_block, add_attention=False,       # no attention in the mid block either
            norm_num_groups=norm_groups(list(block_out_channels)),
            class_embed_type="identity" if embed_dim or noise_aug else None)   # identity: we add our own
        c0 = block_out_channels[0]
        if embed_dim:
            # z_i [B, D] -> [B, 4 C0], summed with the time embedding (the decoder's "projection" embedding)
            self.embed_proj = TimestepEmbedding(embed_dim, 4 * c0)
        if noise_aug:
            # the aug level [B] -> sinusoids [B, C0] -> [B, 4 C0], summed with the time embedding
            self.aug_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.aug_embed = TimestepEmbedding(c0, 4 * c0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_res_up: torch.Tensor,
                z_i: Optional[torch.Tensor] = None, aug_level: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t [B, 3, H, W], t [B] long timesteps, low_res_up [B, 3, H, W], z_i [B, D] unit-norm
        image embeddings (zeros: dropped; required iff the network is conditioned), aug_level [B]
        the noise level added to the low-res image in 8-bit levels (required iff ``noise_aug``)
        -> [B, 3, H, W]."""
        if self.embed_dim and z_i is None:
            raise ValueError("this upsampler is conditioned on z_i: pass the image embeddings")
        if self.noise_aug and aug_level is None:
            raise ValueError("this upsampler was trained with noise conditioning augmentation: pass aug_level")
        extra, emb = {}, []
        if self.embed_dim:
            emb.append(self.embed_proj(z_i.to(x_t.dtype) * math.sqrt(self.embed_dim)))
        if self.noise_aug:
            sinusoids = self.aug_proj(aug_level.float() * AUG_EMBED_SCALE).to(x_t.dtype)
            emb.append(self.aug_embed(sinusoids))
        if emb:
            extra["class_labels"] = sum(emb)
        return self.unet(torch.cat([x_t, low_res_up], dim=1), t, return_dict=False, **extra)[0]

"""The decoder's network: a GLIDE-style UNet (diffusers' UNet2DConditionModel) conditioned on
the CLIP image embedding z_i two ways, as in DALL-E 2 section 2.1:

- z_i is projected and added to the timestep embedding (the UNet's "projection" class
  embedding: a linear map of the [B, D] vector, summed with the time embedding). With
  ``scale_shift_norm`` (GLIDE's and ADM's ``use_scale_shift_norm``, "AdaGN") each ResNet
  block turns that embedding into a per-channel scale and shift of its second GroupNorm's output,
  h = GN(h) (1 + s) + b, instead of adding it before the norm: z_i then gates every channel of
  every block multiplicatively;
- z_i is projected into ``extra_tokens`` (4) context tokens, concatenated with the caption's
  per-token encodings (projected to the cross-attention width), which the attention layers of
  the lower resolutions attend to.

The caption's tokens (CLIP's text tower's per-token encodings, frozen) reach the context through a
linear map. With ``text_layers`` > 0 they then pass through the decoder's own text encoder: that many
bidirectional transformer layers trained with the decoder, as GLIDE's text encoder is in the paper's
decoder (DALL-E 2 section 2.1: the four z_i tokens "concatenated to the sequence of outputs from the
GLIDE text encoder"). CLIP's text tower is causal and trained for a contrastive summary; the decoder's
encoder lets each word see the whole caption (which object a color belongs to), learned for drawing.

Our addition for small compute (``layout_channels`` > 0, 0 turns it off): z_i and the caption's
summary token (the encoding of its last token, which has seen the whole caption) are also
projected into a low-channel [C, S, S] map concatenated with the noised image at the input. The
UNet then gets "what goes where" at full resolution from the first layer, instead of having to
turn a global vector into a spatial layout through many layers; on 2 CPU cores this is the
difference between blobs and shapes (see the closing note of the quality issue). With the decoder's
``layout_weight`` > 0 the map's first 3 channels are also trained to regress the clean image
(:func:`pipeline.decoder.diffusion.training_loss`); measured and left off (docs/MEASURED.md, twenty-seventh
session: the relation up, a color on its shape down).

The attention block (``attention_block``):
- ``transformer``: diffusers' Transformer2DModel per attention level: proj_in, self-attention,
  cross-attention to the context, a GEGLU feed-forward, three LayerNorms, proj_out (13 linear maps);
- ``glide``: GLIDE's block, which is the paper's decoder (Nichol et al. 2021, DALL-E 2 section
  2.1): GroupNorm, one self-attention whose keys and values are the image's positions *and* the
  context tokens projected by their own maps (diffusers' SimpleCrossAttn blocks, built for
  unCLIP/Karlo: ``AttnAddedKVProcessor``), no feed-forward (6 linear maps); its attention levels
  go down and up through ResNet blocks (GLIDE's resblock_updown). On 2 cores the step is dominated by
  the number of small ops, so the leaner block trains faster per step (docs/MEASURED.md "the decoder's
  attention block"). Here ``head_dim`` is each head's width, as it should be.

- ``self_cross`` and ``cross``: the transformer block without its feed-forward, and without its
  self-attention too (GroupNorm, proj_in, a LayerNorm, cross-attention to the context, proj_out).
  diffusers' block is built and those modules (with their LayerNorms) removed, so the weights left
  are the ones ``transformer`` draws from the same seed. They run through the lean forward only:
  1.21x and 1.40x the transformer block's training step on 2 CPU cores, and both draw pairs worse
  (from true z_i, both colors 94 -> 85 and 83 %; docs/MEASURED.md, eighteenth session).

The UNet's forward pass (``lean``): for the transformer block and its cut versions, :mod:`pipeline.lean_unet` runs
diffusers' modules and weights in fewer small ops (the same function: checked against diffusers'
forward in tests/test_lean_unet.py), 1.1x faster a training step on 2 CPU cores; set ``lean`` to
False for diffusers' own forward. The GLIDE block always runs diffusers' forward.

Dropping a condition (for classifier-free guidance) is done by the caller: z_i zeroed, the
caption's tokens masked out. The extra tokens are always attended to, so no attention row is
ever fully masked.
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .. import lean_unet
from ..unets import heads_per_level, norm_groups


class UnclipDecoder(nn.Module):
    def __init__(self, image_size: int, embed_dim: int, text_width: int, block_out_channels: list[int],
                 attention: list[bool], attention_block: str = "transformer", layers_per_block: int = 1, head_dim: int = 32,
                 cross_attention_dim: int = 128, extra_tokens: int = 4, out_channels: int = 3,
                 layout_channels: int = 0, layout_hidden: int = 0, learned_variance: bool = False,
                 scale_shift_norm: bool = False, text_layers: int = 0):
        super().__init__()
        if extra_tokens < 1:
            raise ValueError("extra_tokens must be >= 1 (the context must never be empty)")
        self.embed_dim, self.extra_tokens, self.width = embed_dim, extra_tokens, cross_attention_dim
        self.image_size, self.layout_channels = image_size, layout_channels
        self.learned_variance = learned_variance
        self.unet = UNet2DConditionModel(
            sample_size=image_size, in_channels=3 + layout_channels,
            out_channels=out_channels * (2 if learned_variance else 1),
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim, norm_num_groups=norm_groups(block_out_channels),
            class_embed_type="projection", projection_class_embeddings_input_dim=embed_dim,
            resnet_time_scale_shift="scale_shift" if scale_shift_norm else "default",
            **_attention_blocks(attention_block, attention, block_out_channels, head_dim))
        self.cut = _CUT.get(attention_block, ())         # modules removed from every transformer block
        for block in self.unet.modules():
            if type(block).__name__ == "BasicTransformerBlock":
                for name in self.cut:
                    setattr(block, name, None)
        self.lean = lean_unet.supports(self.unet)        # not a weight: checkpoints do not change
        self.token_proj = nn.Linear(text_width, cross_attention_dim)
        self.text_layers = text_layers
        if text_layers:
            # pre-norm layers of cross_attention_dim with head_dim-wide heads and a 4x GELU MLP (GLIDE's text
            # encoder's shape); no dropout, as the UNet has none; a final LayerNorm as after a pre-norm stack
            layer = nn.TransformerEncoderLayer(cross_attention_dim, max(1, cross_attention_dim // head_dim),
                                               4 * cross_attention_dim, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.text_encoder = nn.TransformerEncoder(layer, text_layers, enable_nested_tensor=False)
            self.text_norm = nn.LayerNorm(cross_attention_dim)
        self.embed_to_tokens = nn.Linear(embed_dim, extra_tokens * cross_attention_dim)
        if layout_channels:
            n_in, n_out = embed_dim + text_width, layout_channels * image_size * image_size
            # linear, or (layout_hidden > 0) one hidden SiLU layer: a linear map of z_i adds a shape's
            # template to a position's, it cannot draw "this shape at that position"; an MLP can
            self.layout = (nn.Sequential(nn.Linear(n_in, layout_hidden), nn.SiLU(), nn.Linear(layout_hidden, n_out))
                           if layout_hidden else nn.Linear(n_in, n_out))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_i: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor, return_layout: bool = False):
        """x_t [B, 3, S, S] noised image, t [B] timesteps, z_i [B, D] image embedding (unit norm,
        or zeros when dropped), tokens [B, L, W] caption encodings, mask [B, L] bool
        -> the network's prediction [B, out_channels, S, S] (twice the channels with learned variance);
        with ``return_layout`` also the layout map [B, C, S, S] (None without layout channels)."""
        b = x_t.shape[0]
        z = z_i * math.sqrt(self.embed_dim)                          # unit variance per component
        extra = self.embed_to_tokens(z).view(b, self.extra_tokens, self.width)
        caption = self.token_proj(tokens)                                 # [B, L, C]
        if self.text_layers:
            caption = self.encode_caption(caption, mask)
        context = torch.cat([extra, caption], dim=1)                       # [B, 4 + L, C]
        context_mask = torch.cat([torch.ones(b, self.extra_tokens, dtype=torch.bool, device=mask.device), mask], 1)
        layout = None
        if self.layout_channels:
            layout = self.layout_map(z, tokens, mask)
            x_t = torch.cat([x_t, layout.to(x_t.dtype)], dim=1)              # [B, 3 + C, S, S]
        if self.lean:
            out = lean_unet.forward(self.unet, x_t, t, context, z, context_mask)
        elif self.cut:
            raise ValueError("a transformer block without some of its modules runs only through "
                             "pipeline/lean_unet.py (lean=True)")
        else:
            out = self.unet(x_t, t, encoder_hidden_states=context, class_labels=z,
                            encoder_attention_mask=context_mask, return_dict=False)[0]
        if self.learned_variance:       # [B, 6, S, S]: the mean's channels, then variance channels in [-1, 1]
            out = torch.cat([out[:, :3], torch.tanh(out[:, 3:])], dim=1)
        return (out, layout) if return_layout else out

    def layout_map(self, z: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The input map [B, C, S, S] from z [B, D] (z_i at unit variance per component, zeros when dropped) and
        the caption's last valid token [B, W] (zeros when the caption is dropped: an all-False mask)."""
        b = z.shape[0]
        last = (mask.sum(1) - 1).clamp(min=0)
        summary = tokens[torch.arange(b, device=tokens.device), last] * mask.any(1, keepdim=True).to(tokens.dtype)
        s = self.image_size
        return self.layout(torch.cat([z, summary], dim=1)).view(b, self.layout_channels, s, s)

    def encode_caption(self, caption: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's text encoder: caption [B, L, C] (projected token encodings), mask [B, L] bool ->
        [B, L, C], every valid token attending to every valid one. A dropped caption (no valid token) attends
        to its first (zeroed) token, so no attention row is empty (older PyTorch returns NaN for a row without
        keys); its outputs stay masked in the context."""
        ignore = ~mask
        ignore[:, 0] &= mask.any(1)
        return self.text_norm(self.text_encoder(caption, src_key_padding_mask=ignore))


# the attention blocks that are diffusers' transformer block with modules removed (each with its LayerNorm)
_CUT = {"self_cross": ("norm3", "ff"), "cross": ("norm1", "attn1", "norm3", "ff")}


def _attention_blocks(kind: str, attention: list[bool], channels: list[int], head_dim: int) -> dict:
    """UNet2DConditionModel's block types and head setting for ``kind`` (see the module docstring)."""
    if kind == "transformer" or kind in _CUT:     # built as transformer, then cut (UnclipDecoder)
        return {"down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
                "attention_head_dim": heads_per_level(channels, head_dim)}    # read as heads: see unets.py
    if kind == "glide":
        return {"down_block_types": tuple("SimpleCrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                "up_block_types": tuple("SimpleCrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
                "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
                "attention_head_dim": head_dim}                      # SimpleCrossAttn blocks read it as the width
    raise ValueError(f"attention_block must be transformer, self_cross, cross or glide, not {kind!r}")

"""A lean forward pass through diffusers' UNet2DConditionModel: the same modules, the same weights,
the same arithmetic, in fewer small ops.

Why: at the decoder's 16 px a training step is thousands of ops on tiny tensors, and on a CPU
each costs its dispatch (a few microseconds, its autograd node, its autocast cast) whatever its
size: about a quarter of the decoder's step at batch 32 does not shrink with the batch (issue 16,
docs/MEASURED.md "the decoder's fixed cost per step"). diffusers' forward is written for every configuration
and adapter at once, so each of its blocks pays for work this UNet never needs:

- every ResNet block applies SiLU to the time embedding again (one SiLU per forward serves all);
- every cross-attention turns the caption mask into a bias again, repeated over its heads
  (``prepare_attention_mask``), where one [B, 1, 1, L] bias broadcast over the heads serves all;
- divisions by ``output_scale_factor`` / ``rescale_output_factor`` of 1, dropouts of p = 0,
  dtype round trips and ``contiguous`` calls;
- the self-attention's q, k, v are three matrix products where one over the concatenated weights
  does (and each cross-attention's k, v two where one does);
- attention through PyTorch's CPU SDPA kernels: at 16 to 64 tokens the attention written out as
  two matrix products and a softmax is faster forward and backward, the math kernel's included.

What it does not change: the parameters (their names and shapes are diffusers', so checkpoints,
EMA and the optimizer do not see a difference) and the function computed (``tests/test_lean_unet.py``
checks the outputs and the gradients against diffusers' forward at fp32 tolerance).

:func:`supports` says whether a given UNet is one this forward covers; callers fall back to
diffusers' own forward otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

_DOWN = {"DownBlock2D", "CrossAttnDownBlock2D"}
_UP = {"UpBlock2D", "CrossAttnUpBlock2D"}


def supports(unet: nn.Module) -> bool:
    """True when ``unet`` is a UNet2DConditionModel built the way the decoder builds it: plain or
    transformer (cross-attention) blocks, ResNet blocks whose time embedding is added (diffusers'
    "default") or scales and shifts the second norm's output (GLIDE's AdaGN, "scale_shift"),
    one transformer layer of self-attention, cross-attention and a GEGLU feed-forward (or without the
    feed-forward, or cut to the cross-attention: the decoder's ``self_cross`` and ``cross``), and no
    adapters, added embeddings or attention processors other than the default."""
    if not isinstance(unet, UNet2DConditionModel):
        return False
    c = unet.config
    if (set(c.down_block_types) - _DOWN or set(c.up_block_types) - _UP
            or c.mid_block_type not in ("UNetMidBlock2DCrossAttn", None)
            or c.resnet_time_scale_shift not in ("default", "scale_shift") or c.addition_embed_type is not None
            or c.time_embedding_type != "positional" or c.class_embed_type not in (None, "projection")
            or c.encoder_hid_dim is not None or c.center_input_sample or c.time_cond_proj_dim is not None
            or c.class_embeddings_concat or c.time_embedding_act_fn is not None or c.act_fn != "silu"
            or c.dropout != 0.0 or c.only_cross_attention is not False and any(_flat(c.only_cross_attention))
            or c.use_linear_projection or c.upcast_attention or c.resnet_skip_time_act
            or c.resnet_out_scale_factor != 1.0):
        return False
    layers = c.transformer_layers_per_block
    if any(n != 1 for n in _flat(layers)):
        return False
    for m in unet.modules():
        name = type(m).__name__
        # the decoder's self_cross block has no feed-forward, its cross block no self-attention either (None)
        if name == "BasicTransformerBlock" and (m.norm_type != "layer_norm" or m.pos_embed is not None
                                                or m.ff is not None and type(m.ff.net[0]).__name__ != "GEGLU"
                                                or (m.attn1 is None) != (m.norm1 is None)
                                                or (m.ff is None) != (m.norm3 is None)):
            return False
        if name == "Attention" and (type(m.processor).__name__ != "AttnProcessor2_0" or m.residual_connection
                                    or m.rescale_output_factor != 1.0 or m.norm_q is not None
                                    or m.norm_cross is not None or m.spatial_norm is not None
                                    or m.group_norm is not None):
            return False
        if name == "Downsample2D" and (not m.use_conv or m.padding == 0 or m.norm is not None):
            return False
        if name == "Upsample2D" and (not m.use_conv or m.use_conv_transpose or not m.interpolate
                                     or m.norm is not None):
            return False
    return True


def _flat(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def forward(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            class_labels: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``unet(sample, timestep, encoder_hidden_states=context, class_labels=class_labels,
    encoder_attention_mask=context_mask, return_dict=False)[0]``, leanly (see the module docstring).

    sample [B, C_in, S, S], timestep [B] (or a scalar), context [B, L, W], class_labels [B, D] or
    None, context_mask [B, L] bool (True: attend) or None -> [B, C_out, S, S]."""
    b = sample.shape[0]
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
    t = t.reshape(-1).expand(b)
    emb = unet.time_embedding(unet.time_proj(t).to(sample.dtype))                # [B, T]
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(sample.dtype)
    temb = F.silu(emb)              # every ResNet block's time input: one SiLU for all of them

    # the caption mask as an additive bias [B, 1, 1, L], broadcast over heads and queries; the
    # same -10000 for a masked token that diffusers adds
    bias = None
    if context_mask is not None:
        bias = ((1 - context_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]

    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            h = _resnet(resnet, h, temb)
            if attentions is not None:
                h = _transformer(attentions[i], h, context, bias)
            skips.append(h)
        if block.downsamplers is not None:
            for down in block.downsamplers:
                h = down.conv(h)
            skips.append(h)

    if unet.mid_block is not None:
        mid = unet.mid_block
        h = _resnet(mid.resnets[0], h, temb)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            h = _resnet(resnet, _transformer(attn, h, context, bias), temb)

    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            h = _resnet(resnet, torch.cat([h, skips.pop()], dim=1), temb)
            if attentions is not None:
                h = _transformer(attentions[i], h, context, bias)
        if block.upsamplers is not None:
            for up in block.upsamplers:
                h = up.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))

    if unet.conv_norm_out is not None:
        h = F.silu(unet.conv_norm_out(h))
    return unet.conv_out(h)


def _resnet(r: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """diffusers' ResnetBlock2D (output scale 1): x [B, C, H, W], temb [B, T] already through
    SiLU -> [B, C_out, H, W]. The time embedding is added before the second norm ("default"), or
    (GLIDE's AdaGN, "scale_shift") projected to a per-channel scale and shift [B, 2 C_out] of its output."""
    h = r.conv1(F.silu(r.norm1(x)))
    emb = r.time_emb_proj(temb)[:, :, None, None]
    if r.time_embedding_norm == "scale_shift":
        scale, shift = emb.chunk(2, dim=1)
        h = r.norm2(h) * (1 + scale) + shift
    else:
        h = r.norm2(h + emb)
    h = r.conv2(F.silu(h))
    if r.conv_shortcut is not None:
        x = r.conv_shortcut(x)
    return x + h


def _transformer(tr: nn.Module, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' Transformer2DModel over continuous input, one BasicTransformerBlock:
    x [B, C, H, W] -> [B, C, H, W]. A block without self-attention or feed-forward (the decoder's
    ``self_cross`` and ``cross`` blocks: those modules are None) skips them."""
    b, c, hh, ww = x.shape
    # proj_in and proj_out are 1x1 convolutions: as linear maps on [B, HW, C] they are the same
    # products without a oneDNN convolution's set-up, forward and backward
    h = tr.norm(x).permute(0, 2, 3, 1).reshape(b, hh * ww, c)        # [B, HW, C]
    h = F.linear(h, tr.proj_in.weight.flatten(1), tr.proj_in.bias)
    block = tr.transformer_blocks[0]
    if block.attn1 is not None:
        h = h + _self_attention(block.attn1, block.norm1(h))
    h = h + _cross_attention(block.attn2, block.norm2(h), context, bias)
    if block.ff is not None:
        geglu, out = block.ff.net[0], block.ff.net[2]
        value, gate = geglu.proj(block.norm3(h)).chunk(2, dim=-1)
        h = h + out(value * F.gelu(gate))
    h = F.linear(h, tr.proj_out.weight.flatten(1), tr.proj_out.bias)
    return h.reshape(b, hh, ww, c).permute(0, 3, 1, 2) + x


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]"""
    b, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * d)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention written out: q [B, H, N, D] (already scaled by 1/sqrt(D)), k, v [B, H, L, D],
    bias [B, 1, 1, L] or None -> [B, H, N, D]. The softmax runs in fp32 (under bf16 autocast too).

    At these sequence lengths (16 to 64 queries, 16 to 64 keys) this is 1.3 to 2.3x faster forward
    and backward than PyTorch's CPU SDPA kernels, the math one included (bench/train_levers.py)."""
    scores = torch.matmul(q, k.transpose(-1, -2))                      # [B, H, N, L]
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v)


def _self_attention(a: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' Attention (AttnProcessor2_0), no mask; q, k, v in one product, the 1/sqrt(D) scale
    folded into q's weights: x [B, N, C] -> [B, N, C]."""
    w = torch.cat([a.to_q.weight * a.scale, a.to_k.weight, a.to_v.weight])      # [3 * inner, C]
    b = None if a.to_q.bias is None else torch.cat([a.to_q.bias * a.scale, a.to_k.bias, a.to_v.bias])
    q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
    return a.to_out[0](_merge(_attend(_heads(q, a.heads), _heads(k, a.heads), _heads(v, a.heads), None)))


def _cross_attention(a: nn.Module, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same with keys and values from ``context`` [B, L, W] (k, v in one product) and the
    additive mask ``bias`` [B, 1, 1, L]: x [B, N, C] -> [B, N, C]."""
    w = torch.cat([a.to_k.weight, a.to_v.weight])
    b = None if a.to_k.bias is None else torch.cat([a.to_k.bias, a.to_v.bias])
    k, v = F.linear(context, w, b).chunk(2, dim=-1)
    q = F.linear(x, a.to_q.weight * a.scale, None if a.to_q.bias is None else a.to_q.bias * a.scale)
    return a.to_out[0](_merge(_attend(_heads(q, a.heads), _heads(k, a.heads), _heads(v, a.heads), bias)))

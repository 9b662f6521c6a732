"""The prior's network: a decoder-only causal transformer (diffusers' PriorTransformer).

Sequence, as in DALL-E 2 section 2.2: [text token encodings (L), z_t, timestep embedding,
noised z_i, learned query]; the output at the query position is the prediction of the clean
image embedding (x0). Knows nothing about diffusion: that lives in ``prior.diffusion``.

Its attention is diffusers' ``AttnProcessor`` (written out: baddbmm, softmax, bmm) with the softmax
in fp32, not the SDPA processor: at the prior's 30-odd tokens PyTorch's CPU SDPA kernels (the math
one upcasts all of the attention to fp32 under bf16 autocast) make the training step 1.2x slower
(bench/train_throughput.py --models prior; tests/test_prior.py checks both compute the same).

Its forward is diffusers' ``PriorTransformer.forward`` with the captions' padding cut away
(:meth:`UnclipPrior.forward`): the rows are sorted by caption length and run in ``LENGTH_GROUPS``
groups, each cut to its longest caption, the four tokens after the caption keeping their
positional embeddings. Exact: a padded token is a key masked by -10000 (exp underflows to 0 in the
fp32 softmax) and the output is read at the query, after every caption token. The corpus's
captions fill about half of the 24-token context (tests/test_prior.py checks it against diffusers').
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import PriorTransformer
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn


LENGTH_GROUPS = 3     # caption length groups per batch (1: cut to the batch's longest caption). On the corpus's
                      # captions (12 of 24 tokens on average) a training step at one thread: 1.54x (3), 1.47x (2),
                      # 1.18x (1) diffusers' forward; at two threads 1.39x (3)


class UnclipPrior(nn.Module):
    def __init__(self, embed_dim: int, text_width: int, context_length: int, layers: int = 4,
                 heads: int = 4, head_dim: int = 32, dropout: float = 0.0):
        super().__init__()
        self.embed_dim = embed_dim
        # PriorTransformer attends to token encodings of width embed_dim; CLIP's text width may differ.
        self.token_proj = nn.Linear(text_width, embed_dim) if text_width != embed_dim else nn.Identity()
        self.transformer = PriorTransformer(
            num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers, embedding_dim=embed_dim,
            num_embeddings=context_length, additional_embeddings=4, dropout=dropout,
            added_emb_type="prd", encoder_hid_proj_type="linear", norm_in_type=None)
        for m in self.transformer.modules():
            if isinstance(m, Attention):
                m.upcast_softmax = True          # the softmax in fp32 under bf16 autocast too
        self.transformer.set_attn_processor(AttnProcessor())
        # forward() composes the transformer's parts as diffusers' forward does for this configuration
        assert self.transformer.norm_in is None and self.transformer.embedding_proj_norm is None
        self.length_groups = LENGTH_GROUPS

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_t: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor, groups: Optional[int] = None) -> torch.Tensor:
        """x_t [B, D] noised (scaled) image embedding, t [B] (or scalar) int timesteps, z_t [B, D]
        text embedding, tokens [B, L, W] text encodings, mask [B, L] bool -> x0 prediction [B, D].

        What ``self.transformer(...)`` computes, without the captions' padding: the sequence
        [caption tokens (n of L), z_t, timestep, x_t, query] with positional embeddings [0, n) and
        [L, L + 4), in ``groups`` groups of rows sorted by caption length (default
        ``self.length_groups``; 0: diffusers' own forward over all L tokens)."""
        tr = self.transformer
        groups = self.length_groups if groups is None else groups
        if groups < 1:
            return tr(hidden_states=x_t, timestep=t, proj_embedding=z_t, encoder_hidden_states=self.token_proj(tokens),
                      attention_mask=mask, return_dict=False)[0]
        b, L = mask.shape
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.ndim == 0 else t
        x = tr.proj_in(x_t)
        time = tr.time_embedding(tr.time_proj(t).to(x.dtype))                    # [B, D]
        tail = torch.stack([tr.embedding_proj(z_t), time, x, tr.prd_embedding.to(x.dtype)[0].expand(b, -1)], dim=1)
        text = tr.encoder_hidden_states_proj(self.token_proj(tokens))            # [B, L, D]
        pos = tr.positional_embedding.to(x.dtype)                                 # [1, L + 4, D]
        # each row's caption length: up to its last real token (0 where the caption is dropped)
        length = (mask * torch.arange(1, L + 1, device=mask.device)).amax(dim=1)
        order = length.argsort()
        outs = []
        for idx in order.tensor_split(max(1, min(groups, b))):
            n = int(length[idx].max()) if len(idx) else 0
            h = torch.cat([text[idx, :n], tail[idx]], dim=1) + torch.cat([pos[:, :n], pos[:, L:]], dim=1)
            bias = F.pad((1 - mask[idx, :n].to(h.dtype)) * -10000.0, (0, tr.additional_embeddings), value=0.0)
            bias = (bias[:, None, :] + tr.causal_attention_mask[:, :n + 4, :n + 4]).to(h.dtype)
            bias = bias.repeat_interleave(tr.config.num_attention_heads, dim=0)
            for block in tr.transformer_blocks:
                h = block(h, attention_mask=bias)
            outs.append(tr.proj_to_clip_embeddings(tr.norm_out(h[:, -1])))       # the query's output
        return torch.cat(outs)[order.argsort()]

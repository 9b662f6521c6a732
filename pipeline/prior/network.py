"""The prior's network: a decoder-only causal transformer (diffusers' PriorTransformer).

Sequence, as in DALL-E 2 section 2.2: [text token encodings (L), z_t, timestep embedding,
noised z_i, learned query]; the output at the query position is the prediction of the clean
image embedding (x0). Knows nothing about diffusion: that lives in ``prior.diffusion``.

Its attention is diffusers' ``AttnProcessor`` (written out: baddbmm, softmax, bmm) with the softmax
in fp32, not the SDPA processor: at the prior's 30-odd tokens PyTorch's CPU SDPA kernels (the math
one upcasts all of the attention to fp32 under bf16 autocast) make the training step 1.2x slower
(bench/train_throughput.py --models prior; tests/test_prior.py checks both compute the same).
"""
from __future__ import annotations

import torch
from diffusers import PriorTransformer
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn


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

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_t: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x_t [B, D] noised (scaled) image embedding, t [B] int timesteps, z_t [B, D] text
        embedding, tokens [B, L, W] text encodings, mask [B, L] bool -> x0 prediction [B, D]."""
        out = self.transformer(hidden_states=x_t, timestep=t, proj_embedding=z_t,
                               encoder_hidden_states=self.token_proj(tokens), attention_mask=mask,
                               return_dict=False)[0]
        return out

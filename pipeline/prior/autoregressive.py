"""The autoregressive prior of unCLIP (DALL-E 2 section 2.2): caption -> discrete code of z_i.

z_i is written as K discrete codes (PCA + per-component buckets, :mod:`pipeline.prior.codebook`)
and a causal transformer predicts them one at a time. The condition is a prefix, as in the paper
("we condition the AR prior on the text caption and the CLIP text embedding by encoding them as a
prefix to the sequence"), followed by a token for the quantized z_i . z_t:

    position   0      1 .. L                 L + 1          L + 2 .. L + K
    token      z_t    caption encodings      dot code       codes c_1 .. c_{K-1}
    predicts   -      -                      c_1            c_2 .. c_K

Attention is causal over the whole sequence, padded caption positions masked as keys (z_t at
position 0 is always there, so no row is empty). Classifier-free guidance: for ``p_uncond`` of the
training examples z_t, the caption and the dot code are dropped together (a learned null z_t, every
caption key masked, a null dot code); at sampling the logits are ``uncond + s (cond - uncond)``,
both halves in one doubled batch. Sampling caches keys and values, so each code costs one token's
pass. The network knows nothing of the codebook's fitting; the stage fits it once
(:meth:`Codebook.fit`) and it is saved with the weights as buffers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import Codebook


class Block(nn.Module):
    """Pre-norm transformer block (GPT-2's layout) with an optional key/value cache."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """x [B, S, C], allowed [B, 1, S, S_keys] bool (may a query attend to a key); ``cache``
        (a dict, filled on the first call) holds the keys and values of the positions before x."""
        b, s, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)   # [B, H, S, C/H]
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, c))
        return x + self.mlp(self.ln_2(x))


class AutoregressivePrior(nn.Module):
    """Causal transformer over [z_t, caption, dot code, codes]; see the module docstring."""

    def __init__(self, embed_dim: int, text_width: int, context_length: int, *, components: int = 32,
                 buckets: int = 64, dot_buckets: int = 32, layers: int = 4, heads: int = 4, head_dim: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        width = heads * head_dim
        self.codebook = Codebook(embed_dim, components, buckets, dot_buckets)
        self.embed_dim, self.context_length, self.components = embed_dim, context_length, components
        self.z_t_in = nn.Linear(embed_dim, width)
        self.z_t_null = nn.Parameter(torch.zeros(width))             # the dropped z_t (guidance)
        self.tokens_in = nn.Linear(text_width, width)
        self.dot_in = nn.Embedding(dot_buckets + 1, width)           # + the dropped dot code
        self.code_in = nn.Embedding(buckets, width)
        # the code's value too (its bucket center in units of its component's spread): buckets are
        # ordered, which a table of embeddings alone must learn bucket by bucket from little data
        self.value_in = nn.Linear(1, width)
        self.position = nn.Parameter(torch.randn(1 + context_length + components, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, buckets)
        for emb in (self.dot_in, self.code_in):         # GPT-2's initialisation of token embeddings
            nn.init.normal_(emb.weight, std=0.02)

    def embed_codes(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Input embeddings [B, S, C] of codes [B, S] of components start .. start + S - 1."""
        centers = self.codebook.centers[start:start + codes.shape[1]]          # [S, N]
        value = centers.gather(1, codes.t()).t() / centers.std(1).clamp(min=1e-6)     # [B, S]
        return self.code_in(codes) + self.value_in(value[..., None].to(self.value_in.weight.dtype))

    @property
    def prefix_length(self) -> int:
        return self.context_length + 2           # z_t, caption, dot code

    def prefix(self, z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, dot: torch.Tensor,
               drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition's embeddings [B, L + 2, C] and which of them are keys [B, L + 2] bool.
        ``drop`` [B] bool: the unconditional input (null z_t, no caption, null dot code)."""
        b = z_t.shape[0]
        zt = torch.where(drop[:, None], self.z_t_null.to(z_t.dtype), self.z_t_in(z_t))
        dot = torch.where(drop, torch.full_like(dot, self.codebook.dot_buckets), dot)
        x = torch.cat([zt[:, None], self.tokens_in(tokens), self.dot_in(dot)[:, None]], 1)
        keys = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask & ~drop[:, None],
                          torch.ones(b, 1, dtype=torch.bool, device=mask.device)], 1)
        return x, keys

    def run(self, x: torch.Tensor, keys: torch.Tensor, start: int, caches: Optional[list] = None) -> torch.Tensor:
        """The blocks over x [B, S, C] at positions start .. start + S - 1, ``keys`` [B, start + S]
        saying which positions so far may be attended to; logits [B, S, buckets]."""
        s = x.shape[1]
        x = x + self.position[start:start + s]
        causal = torch.ones(s, start + s, dtype=torch.bool, device=x.device).tril(start)
        allowed = (causal[None] & keys[:, None, :])[:, None]              # [B, 1, S, start + S]
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, None if caches is None else caches[i])
        return self.head(self.ln_out(x))

    def forward(self, codes: torch.Tensor, z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                dot: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits [B, K, buckets] for codes [B, K] (long) given z_t [B, D] (scaled to
        unit per-dimension), tokens [B, L, W], mask [B, L] bool and the dot code [B] (long)."""
        drop = torch.zeros(len(codes), dtype=torch.bool, device=codes.device) if drop is None else drop
        x, keys = self.prefix(z_t, tokens, mask, dot, drop)
        x = torch.cat([x, self.embed_codes(codes[:, :-1])], 1)              # [B, L + K + 1, C]
        keys = torch.cat([keys, torch.ones_like(codes[:, :-1], dtype=torch.bool)], 1)
        return self.run(x, keys, 0)[:, self.prefix_length - 1:]             # outputs from the dot code on


def training_loss(model: AutoregressivePrior, z_i: torch.Tensor, z_t: torch.Tensor, tokens: torch.Tensor,
                  mask: torch.Tensor, p_uncond: float = 0.1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cross-entropy of the next code (teacher forcing), the condition dropped for ``p_uncond``."""
    with torch.autocast(z_i.device.type, enabled=False):
        codes, dot = model.codebook.encode(z_i), model.codebook.dot_code(z_i, z_t)
    drop = torch.rand(len(z_i), device=z_i.device, generator=generator) < p_uncond
    logits = model(codes, z_t * math.sqrt(z_t.shape[-1]), tokens, mask, dot, drop)
    return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())


@torch.no_grad()
def sample(model: AutoregressivePrior, condition, sampling, *, generator: Optional[torch.Generator] = None,
           x_T: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """One unit image embedding [B, D] per row of ``condition`` (a ``kinds.Caption``):
    :func:`sample_codes` at ``sampling``'s guidance and temperature, decoded by the codebook. There
    is no starting noise: ``x_T`` must be None."""
    if x_T is not None:
        raise ValueError("the autoregressive prior draws codes, not from a starting noise: x_T must be None")
    z_t, tokens, mask = condition
    codes, _ = sample_codes(model, z_t, tokens, mask, guidance_scale=sampling.guidance_scale,
                            temperature=sampling.temperature, generator=generator, stats=stats)
    with torch.autocast(z_t.device.type, enabled=False):
        return model.codebook.decode(codes)


@torch.no_grad()
def sample_codes(model: AutoregressivePrior, z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, *,
                 guidance_scale: float = 1.0, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                 stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes long [B, K] and the dot codes [B] they were drawn under: a dot code from the top half,
    then K codes one at a time (guided logits / temperature, categorical draws from ``generator``).
    ``stats["nfe"]``: network passes per sample (K, twice with guidance: one doubled batch)."""
    b = len(z_t)
    guided = guidance_scale != 1.0
    dot = model.codebook.sample_dot_code(b, generator, z_t.device)
    drop = torch.zeros(b, dtype=torch.bool, device=z_t.device)
    if guided:                                  # [conditional; unconditional] in one batch
        z_t, tokens, mask, dot = (torch.cat([a, a]) for a in (z_t, tokens, mask, dot))
        drop = torch.cat([drop, torch.ones_like(drop)])
    x, keys = model.prefix(z_t * math.sqrt(z_t.shape[-1]), tokens, mask, dot, drop)
    caches = [{} for _ in model.blocks]
    logits = model.run(x, keys, 0, caches)[:, -1]                           # predicts c_1
    codes = []
    for k in range(model.components):
        if guided:
            cond, uncond = logits.float().chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        probs = torch.softmax(logits.float() / max(temperature, 1e-6), -1)
        codes.append(torch.multinomial(probs.cpu(), 1, generator=generator).to(z_t.device)[:, 0])
        if k + 1 < model.components:
            nxt = codes[-1].repeat(2) if guided else codes[-1]
            keys = torch.cat([keys, torch.ones(len(nxt), 1, dtype=torch.bool, device=keys.device)], 1)
            logits = model.run(model.embed_codes(nxt[:, None], k), keys, model.prefix_length + k, caches)[:, -1]
    if stats is not None:
        stats["nfe"] = model.components * (2 if guided else 1)
    return torch.stack(codes, 1), dot[:b]

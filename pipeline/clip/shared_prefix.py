"""Hard negatives encoded from the first token they change (exact for a causal text tower).

A hard negative (clip/negatives.py) is its caption with a few words swapped: "a red circle to the
left of a blue square" and "a red circle to the right of a blue square" share their first seven
tokens. open_clip's text tower is causal (a token attends only to the tokens before it), so at
every layer a negative's hidden states over that shared prefix are its caption's. Only the tokens
from the first changed one on need computing; at each layer their queries attend to the caption's
keys and values over the prefix and to their own after it. The pooled end-of-text state, and so
z_t, is the full encoding's up to rounding; gradients reach the caption's prefix through its keys
and values, as they would through a separate encoding of the negative.

On the corpus's captions 43 % of the negatives' tokens are such a prefix (the relation's reversed
word comes after the first object, the binding's first color is the second or third token), and
the negatives were 60 % of the text tower's tokens (1.44 negatives a caption).

Shapes: B captions, N negatives, H heads of d = W / H, P the longest shared prefix, S the longest
suffix (tokens from the first changed one to end-of-text).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import TEXT_GROUPS

SUFFIX_GROUPS = 2       # the negatives' suffixes by length: relation's are short, binding's long


def is_causal_argmax(m: torch.nn.Module) -> bool:
    """open_clip's default text tower: causal mask, pooled at end-of-text (the largest token id),
    plain residual attention blocks (nn.MultiheadAttention, no LayerScale)."""
    if getattr(m, "attn_mask", None) is None or getattr(m, "text_pool_type", None) != "argmax":
        return False
    if not (hasattr(m, "transformer") and hasattr(m, "positional_embedding")):
        return False
    return all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) and b.attn.batch_first
               and isinstance(b.ls_1, torch.nn.Identity) and isinstance(b.ls_2, torch.nn.Identity)
               and not hasattr(b, "ln_1_kv") for b in m.transformer.resblocks)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """[n, s, W] -> [n, h, s, W / h]"""
    n, s, w = t.shape
    return t.view(n, s, h, w // h).transpose(1, 2)


def _qkv(block, x: torch.Tensor):
    a = block.attn
    q, k, v = F.linear(block.ln_1(x), a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
    return _heads(q, a.num_heads), _heads(k, a.num_heads), _heads(v, a.num_heads)


def _finish(block, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The block after its attention: out projection, residual, MLP. o [n, h, s, d]."""
    n, h, s, d = o.shape
    x = x + block.attn.out_proj(o.transpose(1, 2).reshape(n, s, h * d))
    return x + block.mlp(block.ln_2(x))


def _pool(m: torch.nn.Module, eot: torch.Tensor) -> torch.Tensor:
    """end-of-text states [n, W] -> z_t [n, D] before normalisation."""
    x = m.ln_final(eot)
    proj = m.text_projection
    return x if proj is None else proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _caption_groups(m, tokens, length, P):
    """The captions encoded in length groups (as ``clip.model.text_embeddings``), each cut to its longest caption. Returns the pooled
    states [B, W] in the captions' order, the order the groups hold them in (``order[i]``: the
    caption in row i), and per layer the keys and values over the first P positions, in that
    order [B, H, P, d] (positions past a caption's end are never read: a prefix ends before its
    caption does)."""
    cast = m.transformer.get_cast_dtype()
    order = length.argsort()
    blocks = m.transformer.resblocks
    pooled, kv = [], [([], []) for _ in blocks]
    for idx in order.tensor_split(min(TEXT_GROUPS, len(order))):
        n = int(length[idx].max())
        x = m.token_embedding(tokens[idx, :n]).to(cast) + m.positional_embedding[:n].to(cast)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        for block, (ks, vs) in zip(blocks, kv):
            q, k, v = _qkv(block, x)
            # keys and values over the prefix positions, padded to P where the group is shorter
            ks.append(F.pad(k[:, :, :P], (0, 0, 0, max(0, P - n))))
            vs.append(F.pad(v[:, :, :P], (0, 0, 0, max(0, P - n))))
            x = _finish(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=causal))
        pooled.append(x[torch.arange(len(idx)), length[idx] - 1])
    return torch.cat(pooled)[order.argsort()], order, [(torch.cat(ks), torch.cat(vs)) for ks, vs in kv]


def text_embeddings_with_negatives(model: torch.nn.Module, tokens: torch.Tensor, negatives: torch.Tensor,
                                   source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit z_t of the captions tokens [B, L] and of their hard negatives [N, L], negative n made
    from caption ``source[n]`` [N]: (z_caption [B, D], z_negative [N, D]), the same (up to rounding)
    as ``model.encode_text(..., normalize=True)`` on each, for about 0.6 of the negatives' work.
    Needs open_clip's causal, argmax-pooled text tower (:func:`is_causal_argmax`)."""
    m = model
    cast = m.transformer.get_cast_dtype()
    length = tokens.argmax(dim=-1) + 1                            # [B]: up to end-of-text (the largest id)
    neg_length = negatives.argmax(dim=-1) + 1                      # [N]
    L = tokens.shape[1]
    # the first position where each negative differs from its caption (the start token never does)
    differs = negatives != tokens[source]                          # [N, L]
    start = torch.where(differs.any(dim=1), differs.float().argmax(dim=1), neg_length - 1)
    start = torch.minimum(start, neg_length - 1).clamp(min=1)     # at least the end-of-text token is computed
    P = int(start.max()) if len(start) else 1
    pooled, order, kv = _caption_groups(m, tokens, length, P)
    row = order.argsort()[source]          # [N]: each negative's caption among the keys' rows

    blocks = m.transformer.resblocks
    suffix = neg_length - start                                    # [N] tokens to compute, >= 1
    parts, by_suffix = [], suffix.argsort()
    for idx in by_suffix.tensor_split(min(SUFFIX_GROUPS, max(1, len(by_suffix)))):
        if len(idx) == 0:
            continue
        S, Pg = int(suffix[idx].max()), int(start[idx].max())     # this group's longest suffix and prefix
        pos = (start[idx, None] + torch.arange(S, device=tokens.device)).clamp(max=L - 1)     # [n, S]
        x = m.token_embedding(negatives[idx].gather(1, pos)).to(cast) + m.positional_embedding[pos].to(cast)
        # keys: the caption's prefix positions j < start, then the suffix's own up to the query (causal)
        prefix_ok = torch.arange(Pg, device=x.device)[None, :] < start[idx, None]                # [n, Pg]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()                      # [S, S]
        mask = torch.cat([prefix_ok[:, None, :].expand(-1, S, -1), causal.expand(len(idx), -1, -1)], dim=2)
        src = row[idx]
        for block, (kp, vp) in zip(blocks, kv):
            q, k, v = _qkv(block, x)
            # index_select, not kp[src]: its backward is an index_add, not an accumulating index_put
            kp, vp = kp[:, :, :Pg].index_select(0, src), vp[:, :, :Pg].index_select(0, src)    # [n, H, Pg, d]
            o = F.scaled_dot_product_attention(q, torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2),
                                               attn_mask=mask[:, None])
            x = _finish(block, x, o)
        parts.append(x[torch.arange(len(idx)), suffix[idx] - 1])
    neg_pooled = torch.cat(parts)[by_suffix.argsort()] if parts else pooled[:0]
    z = _pool(m, torch.cat([pooled, neg_pooled]))
    z = F.normalize(z, dim=-1)
    return z[:len(tokens)], z[len(tokens):]

"""Contrastive training of the small CLIP (open_clip's model and InfoNCE loss, our loop).

Recipe notes (found the hard way on the embedded corpus): without warmup the tiny ViT collapses
to a constant embedding (loss stuck at ln(batch)); warmup plus gradient clipping fixes it.
No image augmentation: flips and crops would change the captions' positions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from ..device import autocast, device_of
from ..training import Checkpointer, config_hash, cosine_with_warmup, fit, precision_cache_path
from .data import switching_batches, train_batches
from .model import Clip, build, text_embeddings
from .shared_prefix import is_causal_argmax, text_embeddings_with_negatives
from .vocab import UsedRows, decay_over, used_token_ids


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings' scale and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def negclip_loss(z_i: torch.Tensor, z_t: torch.Tensor, z_neg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE with hard negatives (NegCLIP): image i must pick caption i among the batch's B
    captions and all N negatives; caption i must pick image i among the B images (negatives have
    no image). z_i, z_t [B, D], z_neg [N, D] (N >= 0), all unit. With N = 0 this is open_clip's
    ClipLoss."""
    target = torch.arange(len(z_i), device=z_i.device)
    image_to_text = scale * z_i @ torch.cat([z_t, z_neg]).T                       # [B, B + N]
    text_to_image = scale * z_t @ z_i.T                                            # [B, B]
    return (F.cross_entropy(image_to_text, target) + F.cross_entropy(text_to_image, target)) / 2


def make_loss(clip: Clip, precision: str, device: torch.device, trim: bool = True,
              negatives_from: int = 0, steps_done: Callable[[], int] = lambda: 0, share_prefix: bool = False,
              align: float = 0.0):
    """The training step's loss: ``loss_fn(model, batch)``, InfoNCE over a batch of (uint8
    images [B, 3, S, S], int64 tokens [B, L]) at the model's learned temperature; with hard
    negatives in the batch (+ tokens [B, K, L], mask [B, K]), NegCLIP's loss once
    ``steps_done()`` reaches ``negatives_from`` (before, the plain InfoNCE: their captions are not
    encoded). ``trim``: the text tower encodes the captions without their padding
    (``clip.model.text_embeddings``: the same z_t for less work); False encodes all L tokens of
    every caption (bench/train_throughput.py times the two). ``share_prefix`` (with ``trim``;
    ``clip.shared_prefix``): each negative is encoded from the first token it changes, on its
    caption's keys and values before it (``clip/shared_prefix.py``: the same z_t up to rounding,
    1.15-1.25x the text tower); False encodes each negative whole. ``align`` > 0 (``clip.rewrites_align``):
    the batch ends with the captions' own tokens [B, L] (the texts were drawn from them and their rewrites),
    and + ``align`` x the same NegCLIP loss with the captions' z_t in the images' place: each caption picks
    its drawn text among the batch's texts and their hard negatives, each text its caption."""
    contrastive = ClipLoss()

    def encode_texts(model, tokens, negatives):
        """z_t [B + N, D]: the captions', then those of their negatives that exist (a caption
        without color words has no binding twin): the text tower is half of CLIP's step, and each
        negative costs it a caption."""
        if not negatives:
            texts = tokens.to(device)
        elif trim and share_prefix and is_causal_argmax(model):
            # negatives[0][mask] is caption-major, as mask.nonzero(): its rows are each negative's caption
            source = negatives[1].nonzero()[:, 0]
            return torch.cat(text_embeddings_with_negatives(model, tokens.to(device), negatives[0][negatives[1]].to(device),
                                                            source.to(device)))
        else:
            texts = torch.cat([tokens, negatives[0][negatives[1]]]).to(device)        # [B + N, L]
        return text_embeddings(model, texts) if trim else model.encode_text(texts, normalize=True)

    def loss_fn(model, batch):
        images, tokens, *negatives = batch
        captions = negatives.pop() if align else None
        if negatives and steps_done() < negatives_from:
            negatives = []
        with autocast(precision, device):
            z_i = model.encode_image(clip.preprocess(images.to(device)), normalize=True)
            z_t = encode_texts(model, tokens, negatives)
            z_c = encode_texts(model, captions, []) if align else None
        z_i, z_t = z_i.float(), z_t.float()
        b, scale = len(tokens), model.logit_scale.exp()
        loss = negclip_loss(z_i, z_t[:b], z_t[b:], scale) if negatives else contrastive(z_i, z_t, scale)
        if align:                                       # text to text: [B, B + N] and [B, B]
            loss = loss + align * negclip_loss(z_c.float(), z_t[:b], z_t[b:], scale)
        return loss
    return loss_fn


def clamp_temperature(model: torch.nn.Module) -> None:
    """After every step. CLIP paper: the learned temperature is clipped so logits are scaled by at most 100."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def train(clip_cfg, shard_paths: list[Path], checkpoint_dir: Path,
          on_log: Optional[Callable[[int, dict], None]] = None, depends: Optional[dict] = None) -> tuple[Clip, dict]:
    """Train the small CLIP of ``clip_cfg`` on the train split of ``shard_paths`` -> (clip,
    summary). A checkpoint in ``checkpoint_dir`` is resumed only by the same config and
    ``depends`` (the data's shard digests); the caller clears it once the clip is saved."""
    torch.manual_seed(clip_cfg.seed)
    clip = build(clip_cfg.model)
    model = clip.model.to(device_of())
    device = next(model.parameters()).device
    # the token table's rows that the training captions use, trained alone (clip/vocab.py; None: the whole table)
    # (with the pronoun-first rewrites entering late, the rows of both rewrite sets)
    ids = used_token_ids(shard_paths, clip.tokenize, tuple(clip_cfg.hard_negatives), rewrites=clip_cfg.rewrites,
                         seed=clip_cfg.seed, pronoun_first=clip_cfg.pronoun_first_sets)
    table = model.token_embedding
    if ids is not None:
        model.token_embedding = UsedRows(table, ids)
    # fused: one kernel for the whole update instead of ~100 small ones (CPU and CUDA).
    optimizer = torch.optim.AdamW(param_groups(model, clip_cfg.weight_decay), lr=clip_cfg.lr,
                                  betas=(0.9, 0.98), eps=1e-6, fused=True)
    scheduler = cosine_with_warmup(optimizer, clip_cfg.warmup_steps, clip_cfg.steps)
    read = {}                      # captions read, and how many the rewrites could read (clip/rewrites.py)
    done = [0]                     # optimizer steps taken (fit reports them, a resumed run's start included)

    def stream(pronoun_first: bool):
        return train_batches(shard_paths, clip.tokenize, clip_cfg.batch_size, clip_cfg.seed, clip.image_size,
                             tuple(clip_cfg.hard_negatives), rewrites=clip_cfg.rewrites, stats=read,
                             pronoun_first=pronoun_first, with_captions=bool(clip_cfg.rewrites_align))
    # the pronoun-first rewrites from clip_cfg.pronoun_first_from on (never, without the option)
    batches = switching_batches(stream, clip_cfg.pronoun_first_from, lambda: done[0])
    loss_fn = make_loss(clip, clip_cfg.precision, device, negatives_from=clip_cfg.hard_negatives_from,
                        steps_done=lambda: done[0], share_prefix=clip_cfg.shared_prefix, align=clip_cfg.rewrites_align)

    def after_step(step: int) -> None:
        done[0] = step
        clamp_temperature(model)

    rows = table.num_embeddings if ids is None else len(ids)
    ckpt = Checkpointer(checkpoint_dir, config_hash({"clip": clip_cfg.model_dump(mode="json"), **(depends or {}),
                                                     "token_rows": rows}), every=100)
    summary = fit(model, optimizer, scheduler, batches, loss_fn, steps=clip_cfg.steps, checkpointer=ckpt,
                  grad_clip=clip_cfg.grad_clip, desc="clip: train", on_log=on_log, after_step=after_step,
                  precision=clip_cfg.precision, precision_cache=precision_cache_path(checkpoint_dir))
    if ids is not None:
        model.token_embedding = model.token_embedding.restore(
            table, decay_over(optimizer, scheduler, model.token_embedding.weight, clip_cfg.steps))
    model.eval()
    summary["token_rows"] = rows
    summary["logit_scale"] = round(model.logit_scale.exp().item(), 2)
    if clip_cfg.hard_negatives:
        summary["hard_negatives_from_step"] = clip_cfg.hard_negatives_from
    if clip_cfg.rewrites and read.get("captions"):
        summary["rewrites"] = {"per_caption": clip_cfg.rewrites,
                               "captions_rewritten_pct": round(100 * read["rewritten"] / read["captions"], 2),
                               **({"align": clip_cfg.rewrites_align} if clip_cfg.rewrites_align else {}),
                               **({"pronoun_first_from_step": clip_cfg.pronoun_first_from}
                                  if clip_cfg.rewrites_pronoun_first else {})}
    return clip, summary

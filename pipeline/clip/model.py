"""The pipeline's CLIP: an open_clip model, saved as a self-describing directory.

The directory (``models/clip/``, one part of the trained bundle)::

    open_clip_config.json   the open_clip model config (embed_dim, vision_cfg, text_cfg)
    preprocess.json         image_size, mean, std the image tower expects
    model.safetensors       weights
    run_config.json         the resolved pipeline config it was trained/loaded with, and versions

Our own model is a small ViT registered with open_clip under ``MODEL_NAME``; a pretrained one is
named ``<arch>:<tag or local checkpoint>`` (e.g. ``ViT-B-32:laion2b_s34b_b79k``).
"""
from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from safetensors.torch import load_file, save_file

from ..bundle import versions
from .tokenize import fast_tokenizer

MODEL_NAME = "unclip-small-vit"


class _QuietRandomInit(logging.Filter):
    # open_clip warns "No pretrained weights loaded" on every create_model(pretrained=None);
    # for us that is the normal path (we train, or load our own safetensors right after).
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


logging.getLogger().addFilter(_QuietRandomInit())
# OpenAI CLIP's normalisation, which open_clip uses by default.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def open_clip_config(m) -> dict:
    """open_clip JSON config for our small ViT from ``clip.model`` of params.yaml."""
    return {
        "embed_dim": m.embed_dim,
        "vision_cfg": {"image_size": m.image_size, "layers": m.vision_layers, "width": m.vision_width,
                       "patch_size": m.vision_patch_size, "head_width": min(64, m.vision_width)},
        "text_cfg": {"context_length": m.context_length, "vocab_size": 49408, "width": m.text_width,
                     "heads": m.text_heads, "layers": m.text_layers},
    }


def conv_stem(width: int, patch_size: int) -> torch.nn.Sequential:
    """Stride-2 3x3 convolutions in place of the ViT's linear patch embedding.

    "Early convolutions help transformers see better" (Xiao et al. 2021): a small conv stem
    makes ViTs optimise faster and more stably; here it is what lets a tiny CLIP learn shapes
    within a CPU budget. Output is the patch grid the ViT expects: [B, width, S/p, S/p].
    """
    n = int(math.log2(patch_size))
    if 2 ** n != patch_size or n < 1:
        raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
    chans = [3] + [max(16, width >> (n - 1 - i)) for i in range(n)]
    layers: list[torch.nn.Module] = []
    for i in range(n):
        layers.append(torch.nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1))
        if i < n - 1:
            layers.append(torch.nn.GELU())
    return torch.nn.Sequential(*layers)


def _create(name: str, stem: str):
    model = open_clip.create_model(name, pretrained=None)
    if stem == "conv":
        v = model.visual
        v.conv1 = conv_stem(v.conv1.out_channels, v.conv1.kernel_size[0])
    return model


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def _register(name: str, config: dict) -> None:
    """Make ``config`` open_clip's model ``name`` in this process.

    open_clip registers model configs only from JSON files on its search path; the file goes to
    a private temp dir and is gone when this returns (open_clip keeps what it read). Never under
    the directory being loaded: that may be read-only (DVC's hardlinked cache is 0444), a DVC cache
    object or a registry artifact, and a write there would change what DVC and MLflow track.
    ``name`` comes from a CLIP directory's open_clip_config.json: it becomes a file name, so it must be
    a plain one."""
    if not NAME.fullmatch(name):
        from ..errors import SavedModelError
        raise SavedModelError(f"CLIP model name {name!r}: expected letters, digits, '_', '.', '+' or '-' (a CLIP "
                              f"directory's open_clip_config.json 'name')")
    with tempfile.TemporaryDirectory(prefix="unclip-open_clip-") as scratch:
        path = Path(scratch) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


@dataclass
class Clip:
    """A CLIP model with its tokenizer and the preprocessing its image tower expects."""
    model: open_clip.CLIP
    tokenizer: object
    name: str
    config: dict
    image_size: int
    mean: tuple
    std: tuple
    stem: str = "patch"         # "patch" (open_clip's linear patch embedding) or "conv" (conv_stem)

    @property
    def context_length(self) -> int:
        return self.config["text_cfg"].get("context_length", 77)

    @property
    def embed_dim(self) -> int:
        return self.config["embed_dim"]

    @property
    def text_width(self) -> int:
        return self.config["text_cfg"]["width"]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float [B, 3, S, S] at the tower's resolution."""
        x = images.float().div_(255)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """captions -> token ids [B, context_length] int64 (open_clip's ids, see clip/tokenize.py)."""
        return self.tokenizer(list(captions))

    def encode_image(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> unit-norm image embeddings z_i [B, D]."""
        return F.normalize(self.model.encode_image(self.preprocess(images_uint8)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B, L] -> (z_t [B, D] unit-norm, per-token encodings [B, L, W], mask [B, L] bool).

        The per-token encodings are the text transformer's final-layer states (after ln_final):
        what unCLIP's prior and GLIDE-style decoder attend to. The mask marks real tokens
        (start .. end-of-text inclusive); padding is False.
        """
        z_t, x = text_tower(self.model, tokens)
        eot = tokens.argmax(dim=-1)                                   # end-of-text has the largest id
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot[:, None]
        return F.normalize(z_t, dim=-1), x, mask


def text_tower(m: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's text tower on tokens [B, n], n <= context_length (the first n positions):
    (z_t [B, D] before normalisation, the per-token states after ln_final [B, n, W])."""
    n = tokens.shape[1]
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
    mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
    x = m.ln_final(m.transformer(x, attn_mask=mask))
    pooled = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    proj = m.text_projection
    z_t = pooled if proj is None else proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    return z_t, x


TEXT_GROUPS = 3     # length groups of text_embeddings: 3 do 0.60 of the padded tokens' work on the corpus's
                    # captions and their negatives (1 group: 0.83, 4: 0.58, every real token only: 0.51)


def text_embeddings(model: torch.nn.Module, tokens: torch.Tensor, groups: int = TEXT_GROUPS) -> torch.Tensor:
    """tokens [N, L] -> unit z_t [N, D], as ``model.encode_text(tokens, normalize=True)``, with the
    padding cut away: the captions are sorted by length and encoded in ``groups`` groups, each cut
    to its longest caption.

    Exact for open_clip's causal text tower: a token attends only to the tokens before it, so the
    padding after a caption's end-of-text token never reaches it, and the pool reads that token.
    The corpus's captions average 12 of their 24 tokens and a training batch's text tower (a
    caption and about 1.4 hard negatives per image) is most of CLIP's step. A text tower without
    a causal mask (padding would be attended to) or another pool is encoded whole.
    """
    m = model
    causal = getattr(m, "attn_mask", None) is not None and getattr(m, "text_pool_type", None) == "argmax" \
        and hasattr(m, "transformer") and hasattr(m, "positional_embedding")
    if not causal or groups < 1 or len(tokens) == 0:
        return m.encode_text(tokens, normalize=True)
    length = tokens.argmax(dim=-1) + 1                              # [N]: up to end-of-text (the largest id)
    order = length.argsort()
    parts = [text_tower(m, tokens[idx, :int(length[idx].max())])[0]     # each group cut to its longest caption
             for idx in order.tensor_split(min(groups, len(order)))]
    z_t = torch.cat(parts)[order.argsort()]                           # back to the input's order
    return F.normalize(z_t, dim=-1)


def build(model_cfg) -> Clip:
    """A freshly initialised small CLIP from ``clip.model``."""
    config = open_clip_config(model_cfg)
    _register(MODEL_NAME, config)
    model = _create(MODEL_NAME, model_cfg.vision_stem)
    return Clip(model, fast_tokenizer(open_clip.get_tokenizer(MODEL_NAME)), MODEL_NAME, config,
                model_cfg.image_size, MEAN, STD, model_cfg.vision_stem)


def save(clip: Clip, out: Path, run_config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"name": clip.name, "stem": clip.stem, **clip.config},
                                                          indent=2))
    (out / "preprocess.json").write_text(json.dumps(
        {"image_size": clip.image_size, "mean": list(clip.mean), "std": list(clip.std)}, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in clip.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "run_config.json").write_text(json.dumps({"config": run_config, "versions": versions()}, indent=2))


def load(path: Path, device: str | torch.device = "cpu") -> Clip:
    """Load a CLIP directory written by :func:`save`. Fails with a clear message if it is incomplete."""
    path = Path(path)
    missing = [f for f in ("open_clip_config.json", "preprocess.json", "model.safetensors") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a CLIP directory (missing {', '.join(missing)}); run `unclip stage clip`")
    cfg = json.loads((path / "open_clip_config.json").read_text())
    name, stem = cfg.pop("name"), cfg.pop("stem", "patch")
    pre = json.loads((path / "preprocess.json").read_text())
    _register(name, cfg)                  # nothing is written under ``path``
    model = _create(name, stem)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.to(device).eval()
    return Clip(model, fast_tokenizer(open_clip.get_tokenizer(name)), name, cfg, pre["image_size"],
                tuple(pre["mean"]), tuple(pre["std"]), stem)


def load_pretrained(spec: str) -> Clip:
    """Resolve ``clip.pretrained``: a CLIP directory, or ``<arch>:<open_clip tag | checkpoint file>``.

    Offline, an open_clip tag that is not in the local cache fails with a message saying so.
    """
    p = Path(spec)
    if p.is_dir():
        return load(p)
    if ":" not in spec:
        raise ValueError(f"clip.pretrained={spec!r}: expected a CLIP directory or '<arch>:<tag or file>' "
                         f"(e.g. 'ViT-B-32:laion2b_s34b_b79k'); known archs: {', '.join(open_clip.list_models()[:8])}, ...")
    arch, source = spec.split(":", 1)
    if arch not in open_clip.list_models():
        raise ValueError(f"clip.pretrained={spec!r}: unknown open_clip architecture {arch!r}")
    if not Path(source).exists() and source not in open_clip.list_pretrained_tags_by_model(arch):
        raise ValueError(f"clip.pretrained={spec!r}: {source!r} is neither a local file nor an open_clip tag "
                         f"of {arch} (tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch))})")
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=source)
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        raise RuntimeError(f"clip.pretrained={spec!r}: could not load weights ({type(err).__name__}: {err}). "
                           "Offline, only weights already in the local cache or a local file can be used.") from err
    config = open_clip.get_model_config(arch)
    pre = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    size = config["vision_cfg"].get("image_size", 224)
    return Clip(model.eval(), fast_tokenizer(open_clip.get_tokenizer(arch)), arch, config,
                size if isinstance(size, int) else size[0],
                tuple(pre.get("mean", MEAN)), tuple(pre.get("std", STD)))

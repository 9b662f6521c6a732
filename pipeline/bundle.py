"""The bundle: a trained unCLIP system, one directory holding ``clip/ prior/ decoder/
upsampler_1/ ...`` (the workspace's ``models/``), which :mod:`pipeline.generate` loads, evaluate
measures, the promotion gate registers and MLflow serves (``artifacts/bundle/``). "Bundle" means
that whole directory and nothing else; each of its parts is a model directory, and this module
saves and loads the diffusion models' (prior, decoder, upsamplers; the CLIP's is
:mod:`pipeline.clip.model`'s).

Each model directory is self-describing::

    model.safetensors   the EMA weights (what sampling uses)
    model.json          kind, constructor arguments, the prediction type, sampling defaults,
                        the resolved config of the run, package versions, and the CLIP it was
                        trained against (the sha256 of models/clip/model.safetensors)

:mod:`pipeline.generate` checks that the prior and the decoder were trained against the CLIP
beside them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from .workspace import file_sha256


def versions() -> dict:
    """The package versions a model directory records (``model.json``, the CLIP's ``run_config.json``)."""
    import platform

    import numpy as np
    import open_clip
    import webdataset
    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "webdataset": getattr(webdataset, "__version__", "unknown")}


PARTS = ("clip", "prior", "decoder")       # plus every upsampler_*, in order


def parts(models: Path) -> list[Path]:
    """The part directories of a bundle ``models``: clip, prior, decoder, upsampler_1, ..."""
    models = Path(models)
    return [models / n for n in PARTS] + sorted(models.glob("upsampler_*"))


def digests(models: Path) -> dict[str, Optional[str]]:
    """{part: sha256 of its model.safetensors (None where absent)}: which weights an evaluation
    measured, so the promotion gate registers exactly those (``pipeline.registry``)."""
    return {p.name: file_sha256(p / "model.safetensors") if (p / "model.safetensors").exists() else None
            for p in parts(models)}


def clip_identity(clip_dir: Path) -> dict:
    """How a model names the CLIP it was trained against."""
    weights = Path(clip_dir) / "model.safetensors"
    return {"path": str(clip_dir), "sha256": file_sha256(weights) if weights.exists() else None}


def save_model(out: Path, model: torch.nn.Module, *, kind: str, arch: dict, run_config: dict,
               info: Optional[dict] = None, clip: Optional[dict] = None) -> None:
    """``arch``: the keyword arguments that rebuild ``model``'s class; ``info``: anything a loader
    needs besides (prediction type, sampling defaults, resolution chain)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps({
        "kind": kind, "arch": arch, "info": info or {}, "clip": clip, "config": run_config,
        "versions": versions()}, indent=2))


def run_config(cfg) -> dict:
    """The resolved config a model directory records (``model.json``'s ``config``, the CLIP's
    ``run_config.json``): everything but ``tracking``, whose URI may hold credentials and which a
    model does not depend on, and ``cluster`` (where it ran, not what it computed: a model trained
    under torchrun is byte-identical to one trained in-process). Bundles go to the MLflow registry
    and to whoever is given them."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("tracking", "cluster")}


def read_meta(path: Path, kind: str) -> dict[str, Any]:
    path = Path(path)
    if not (path / "model.json").exists() or not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} holds no trained {kind} (model.json + model.safetensors); "
                                f"run `unclip stage {kind}` or point at a trained {kind}'s directory")
    meta = json.loads((path / "model.json").read_text())
    if meta.get("kind") != kind:
        from .errors import SavedModelError
        raise SavedModelError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}")
    return meta


def load_model(path: Path, kind: str, build: Callable[..., torch.nn.Module],
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild with ``build(**arch)``, load the weights, eval mode. Returns (model, meta)."""
    meta = read_meta(path, kind)
    model = build(**meta["arch"])
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.to(device).eval(), meta

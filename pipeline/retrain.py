"""Retraining on grown data: which trained models a rerun keeps, continues, or trains anew.

Every model directory records its *lineage* (``lineage.json``): the sha256 of each data shard
it was trained on. When DVC reruns a training stage because its data grew (an addition's
shards joined the earlier, unchanged ones), the ``retrain`` section of params.yaml decides:

- CLIP and the judge (``retrain.clip`` / ``retrain.judge``: keep) stay as they are when they were
  trained with the same config. DALL-E 2 trains its prior and decoder against a frozen CLIP; a
  new CLIP would be a new embedding space, every embedding and model after it stale. The judge
  is the promotion gate's yardstick: a candidate and the champion are judged by the same one.
- The prior, decoder and upsamplers (``retrain.init_from``: last) continue from their last
  weights for ``retrain.finetune_fraction`` of their steps, when the architecture, the stage's
  config and (for the prior and decoder) the CLIP are the same.

Anything else (a changed config, data that did not just grow, no earlier model, ``scratch``)
trains from scratch, and the stage's figures say which happened and why (``retrain`` key).
DVC keeps model outputs in place while their stage reruns (``persist: true`` in dvc.yaml), so
the last weights are there to continue from.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .data.incremental import shard_digests
from .workspace import atomic_write_json, file_sha256

LINEAGE = "lineage.json"
FIGURES = "figures.json"      # a kept model's figures: DVC deletes metrics/<stage>.json before a rerun


def lineage(data_dir: Path) -> dict:
    """What a model trained on ``data_dir`` records: its shards' digests."""
    return {"data_dir": Path(data_dir).name, "shards": shard_digests(data_dir)}


def write_lineage(model_dir: Path, data_dir: Path, figures: Optional[dict] = None) -> None:
    """Record what the model in ``model_dir`` was trained on (and its ``figures``, for keeping it)."""
    atomic_write_json(Path(model_dir) / LINEAGE, lineage(data_dir))
    if figures is not None:
        atomic_write_json(Path(model_dir) / FIGURES, figures)


def data_grew(model_dir: Path, data_dir: Path) -> tuple[bool, str]:
    """Whether ``data_dir`` is the model's training data plus new shards (and why not)."""
    path = Path(model_dir) / LINEAGE
    if not path.exists():
        return False, f"no {LINEAGE} beside the earlier model (what it was trained on is unknown)"
    before = json.loads(path.read_text())["shards"]
    now = shard_digests(data_dir)
    changed = [n for n, d in before.items() if now.get(n) != d]
    if changed:
        return False, f"{len(changed)} of its training shards changed (e.g. {changed[0]}), the data did not just grow"
    added = len(set(now) - set(before))
    if not added:
        return False, "no new data since it was trained"
    return True, f"{added} new shard(s) beside its {len(before)}"


def _saved_config(model_dir: Path) -> Optional[dict]:
    for name in ("model.json", "run_config.json"):      # bundle.save_model / the CLIP's open_clip save
        path = Path(model_dir) / name
        if path.exists():
            saved = json.loads(path.read_text())
            return saved.get("config", saved)
    return None


def _section(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config


def keep_frozen(cfg, ws, stage: str, policy: str, model_dir: Path, data_dir: Path,
                section: str) -> tuple[Optional[dict], str]:
    """(the earlier figures of ``stage`` plus a ``retrain`` note, why) when its model is kept as
    it is, (None, why it trains). Kept: policy "keep", same config section, the data only grew."""
    metrics_path = Path(model_dir) / FIGURES
    saved = _saved_config(model_dir)
    if policy != "keep":
        return None, f"retrain.{stage}: {policy}"
    if saved is None or not metrics_path.exists():
        return None, "no earlier model and figures"
    if _section(saved, section) != _section(cfg.model_dump(mode="json"), section):
        return None, f"{section} changed since the earlier model"
    grew, why = data_grew(model_dir, data_dir)
    if not grew:
        return None, why
    figures = json.loads(metrics_path.read_text())
    for k in ("stage", "profile", "duration_s", "retrain"):
        figures.pop(k, None)
    figures["retrain"] = {"mode": "kept", "why": f"retrain.{stage}: keep; the data grew ({why})"}
    return figures, figures["retrain"]["why"]


@dataclass
class WarmStart:
    """Continue from ``weights`` (a model.safetensors) for ``steps`` steps."""
    weights: Path
    sha256: str
    steps: int
    warmup_steps: int
    why: str

    def describe(self) -> dict:
        return {"mode": "continued", "from_sha256": self.sha256, "steps": self.steps, "why": self.why}


def warm_start(cfg, model_dir: Path, data_dir: Path, section: str, tc, arch: dict,
               clip_sha: Optional[str] = None) -> tuple[Optional[WarmStart], str]:
    """(how to continue, why) or (None, why it trains from scratch). ``tc``: the stage's
    TrainConfig (its steps and warmup set the fine-tune's); ``section``: its dotted config key."""
    r = cfg.retrain
    if r.init_from != "last":
        return None, "retrain.init_from: scratch"
    meta_path = Path(model_dir) / "model.json"
    weights = Path(model_dir) / "model.safetensors"
    if not (meta_path.exists() and weights.exists()):
        return None, "no earlier model"
    meta = json.loads(meta_path.read_text())
    if meta.get("arch") != json.loads(json.dumps(arch)):
        return None, "the architecture changed"
    if _section(meta.get("config", {}), section) != _section(cfg.model_dump(mode="json"), section):
        return None, f"{section} changed since the earlier model"
    if clip_sha is not None and (meta.get("clip") or {}).get("sha256") != clip_sha:
        return None, "the CLIP changed (another embedding space)"
    grew, why = data_grew(model_dir, data_dir)
    if not grew:
        return None, why
    steps = max(1, math.ceil(tc.steps * r.finetune_fraction))
    warmup = min(tc.warmup_steps, max(1, math.ceil(tc.warmup_steps * r.finetune_fraction)))
    return WarmStart(weights, file_sha256(weights), steps, warmup,
                     f"the data grew ({why}); {steps} of {tc.steps} steps from the last weights"), ""


def describe(warm: Optional[WarmStart], scratch_why: str) -> dict:
    """The ``retrain`` figure of a training stage: how it started."""
    return warm.describe() if warm is not None else {"mode": "scratch", "why": scratch_why}

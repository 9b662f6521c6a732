"""Ground truth: whether the data carries it, and the stages that run only where it does.

The embedded corpus knows what every caption describes (``gt`` in each sample's json: objects
with color, shape, size, position; relation; background). A user's URL list does not. Stages
and figures that need ground truth are skipped on such data, and say so instead of writing zeros:

    corpus     skipped when ``crawl.url_list`` is set (the user's list replaces it)
    judge      skipped: it is trained on the corpus's truth
    evaluate   the judged figures (quality, quality_by_stage, the judged ablation, bars,
               background, diversity) are not measured; the standard metrics, CLIP score, the
               prior's cosines, the ablation in those figures and the grids are

A skipped stage still writes its DVC output directory, holding only ``skipped.json`` (the
reason), so DVC's graph stays one graph for both kinds of data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .data.shards import iter_samples, sample_meta

SKIPPED = "skipped.json"
PEEK = 1000          # samples looked at: the corpus's every sample has truth, a URL list's none

NO_TRUTH = "the data carries no ground truth (a URL list's pairs have no 'gt'; only the embedded corpus does)"
NOT_MEASURED = ("quality", "quality_by_stage", "frechet_floor_real_vs_real", "bars", "background_real_images",
                "diversity", "judge_test_accuracy")


def has_ground_truth(paths: list[Path], limit: int = PEEK) -> bool:
    """True when any of the first ``limit`` samples of ``paths`` carries ground truth."""
    for n, sample in enumerate(iter_samples(paths)):
        if n >= limit:
            break
        if sample_meta(sample).get("gt"):
            return True
    return False


def write_skipped(out: Path, stage: str, reason: str) -> dict:
    """Mark ``out`` (a stage's output directory, being written) as a skipped stage's; returns the
    stage's figures."""
    figures = {"skipped": reason}
    (Path(out) / SKIPPED).write_text(json.dumps({"stage": stage, **figures}, indent=1) + "\n")
    return figures


def skipped(directory: Path) -> Optional[str]:
    """Why the stage that owns ``directory`` was skipped, or None when it ran."""
    path = Path(directory) / SKIPPED
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("skipped") or "skipped"

"""A synthetic evaluation in a workspace: metrics/evaluate.json and the grids of reports/evaluate."""
from __future__ import annotations

import json

from pipeline import bundle
from pipeline.evaluate import with_se


def fake_evaluation(ws, seed: int, color: float, fid: float, shape: float = 50.0, fd: float = 12.5, n: int = 2):
    from PIL import Image
    figures = {"stage": "evaluate", "profile": "smoke", "seed": seed, "n_captions": 4, "n_single": 2,
               "quality": {"single": {"n": n, "color": color, "shape": shape, "size": 100.0, "position": 100.0, "all": 50.0},
                           "pair": {"n": n, "colors": 50.0, "shapes": 0.0, "relation": 50.0, "all": 0.0},
                           "frechet_distance": fd},
               "frechet_floor_real_vs_real": 3.25,
               "standard": {"metric": "FD-CLIP", "feature_extractor": "the pipeline's CLIP", "fid": fid,
                            "fid_floor_real_vs_real": 0.5, "kid_mean": 0.01, "kid_std": 0.002, "n_generated": 4,
                            "n_real": 4, "kid_subsets": 100, "kid_subset_size": 4, "seed": seed},
               "clip_score_conventions": {"decoder": {"hessel_2.5": 0.61, "torchmetrics_100": 24.4, "n": 4}},
               "bars": {"single color": {"value": color, "bar": 95, "ok": color >= 95}},
               "nfe_total": 40}
    figures["ablation"] = {"unclip": figures["quality"] | {"nfe_per_image": 40}}
    figures["phrasings"] = {"n_captions": 4, "test_split": with_se(figures["quality"]),       # as evaluate writes them
                            "reordered": with_se({"single": {"n": n, "color": max(color - 1, 0.0), "shape": max(shape - 20, 0.0),
                                                             "size": 90.0, "position": 100.0, "all": 25.0},
                                                  "pair": {"n": n, "colors": 40.0, "shapes": 0.0, "relation": 10.0,
                                                           "all": 0.0},
                                                  "frechet_distance": fd + 5, "example": "red circle, small, at the top"})}
    figures["bundle"] = bundle.digests(ws.root / "models")       # as evaluate writes it: the weights measured
    ws.metrics_dir.mkdir(exist_ok=True)
    ws.metrics_path("evaluate").write_text(json.dumps(figures))
    out = ws.reports / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    for name, shade in (("prompts_decoder", 40), ("prompts_upsample_1", 90), ("test_real_vs_generated", 150),
                        ("worst", 200)):
        Image.new("RGB", (66, 34), (shade + seed, 20, 20)).save(out / f"{name}.png")
    (out / "worst.json").write_text(json.dumps([{"index": 1, "passed": 0.25, "failed": ["shape", "size", "position"],
                                                 "judge_saw": {"n_objects": 1}, "caption": "a red circle"}]))
    return figures

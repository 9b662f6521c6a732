"""The `evaluate` stage (first version): the whole cascade on held-out captions, fixed seeds.

Figures (``metrics/evaluate.json``, and MLflow):

- ``clip_score``: 100 * mean cos(CLIP image embedding of the generated image, z_t of its
  caption), torchmetrics' convention, with the pipeline's CLIP; after every stage of the
  cascade, beside the same score of the real test images (what a perfect generator would get)
  and of generated images scored against shuffled captions (what an unrelated image gets).
- the prior's cosine figures on the test split (as the prior stage reports them on val);
- network evaluations and seconds per image.

Grids (``reports/evaluate/``, logged as MLflow artifacts): the README's prompts x seeds after
every stage, and test captions beside their real images.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from . import tracking
from .config import PriorConfig
from .data.shards import shard_paths
from .embeddings import load_split
from .generate import Unclip, save_grid
from .images import grid, resize, save_png, to_model, to_uint8
from .prior.stage import evaluate as prior_figures
from .progress import say
from .stages import StageError
from .workspace import atomic_dir


def clip_score(clip, images_uint8: torch.Tensor, z_t: torch.Tensor) -> float:
    """100 * mean cos(CLIP(image), z_t) (torchmetrics' CLIPScore convention, without its clamp at 0)."""
    with torch.no_grad():
        e = clip.encode_image(to_uint8(resize(to_model(images_uint8), clip.image_size)).to(z_t.device)).float()
    return round(100 * F.cosine_similarity(e, z_t, dim=-1).mean().item(), 2)


def held_out_captions(test: dict, n: int) -> list[int]:
    """The first ``n`` test rows whose caption describes their image (not a planted mismatch)."""
    rows = [i for i, gt in enumerate(test["gt"]) if not (gt or {}).get("mismatched")]
    return rows[:n]


def run(cfg, ws) -> dict:
    e = cfg.evaluate
    paths = shard_paths(ws.embeddings)
    if not paths:
        raise StageError(f"no shards in {ws.embeddings}: run the embed stage first")
    try:
        unclip = Unclip.load(ws.root / "models")
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None
    test = load_split(paths, "test", image_size=unclip.sizes[-1])
    rows = held_out_captions(test, e.n_captions)
    if not rows:
        raise StageError("no test-split captions in the embeddings")
    idx = torch.tensor(rows)
    captions = [test["captions"][i] for i in rows]
    result = unclip.generate(captions, n=1, seed=e.seed, batch_size=e.batch_size)
    z_t = result["z_t"].to(unclip.device)
    shuffled = torch.roll(z_t, 1, 0)
    names = ["decoder"] + [f"upsample_{j}" for j in range(1, len(result["stages"]))]
    scores = {name: clip_score(unclip.clip, imgs, z_t) for name, imgs in zip(names, result["stages"])}
    figures = {
        "n_captions": len(rows), "seed": e.seed, "sizes": unclip.sizes,
        "clip_score": scores,
        "clip_score_real_images": clip_score(unclip.clip, test["images"][idx], z_t),
        "clip_score_shuffled_captions": clip_score(unclip.clip, result["images"], shuffled),
        "nfe_per_image": result["nfe"], "nfe_total": sum(result["nfe"].values()),
        "seconds_per_image": round(result["seconds"] / len(rows), 3),
    }
    prior = unclip.prior_meta["config"]["prior"]
    test_sub = {k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in rows]) for k, v in test.items()
                if k != "n"} | {"n": len(rows)}
    figures["prior"] = prior_figures(unclip.prior, test_sub, PriorConfig.model_validate(prior))

    with atomic_dir(ws.reports / "evaluate") as out:
        prompts = list(e.grid_prompts)
        examples = unclip.generate(prompts, n=e.grid_seeds, seed=e.seed, batch_size=e.batch_size)
        for k, name in enumerate(names):
            save_grid(examples, e.grid_seeds, out / f"prompts_{name}.png", stage=k)
        # held-out captions: real test image above the generated one, 8 per row pair
        k = min(16, len(rows))
        real, gen = test["images"][idx[:k]], result["images"][:k]
        pairs = [t for i in range(0, k, 8) for t in (real[i:i + 8], gen[i:i + 8])]
        save_png(grid(torch.cat(pairs), 8), out / "test_real_vs_generated.png")
        (out / "test_captions.json").write_text(json.dumps(captions[:k], indent=1))
    for png in sorted((ws.reports / "evaluate").glob("*.png")):
        tracking.log_artifact(png, "evaluate")
    tracking.log_metrics({f"clip_score_{k}": v for k, v in scores.items()}
                         | {"clip_score_real_images": figures["clip_score_real_images"],
                            "nfe_total": figures["nfe_total"]}
                         | {f"prior_{k}": v for k, v in figures["prior"].items() if k.startswith("cos")})
    final = names[-1]
    say("evaluate", f"{len(rows)} test captions: CLIP score {scores[final]} (real images "
                    f"{figures['clip_score_real_images']}, shuffled captions {figures['clip_score_shuffled_captions']}); "
                    f"{figures['nfe_total']} network evaluations per image "
                    f"-> {(ws.reports / 'evaluate').relative_to(ws.root)}/")
    return figures

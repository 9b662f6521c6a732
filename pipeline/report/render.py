"""Self-contained HTML pages from snapshots: one report per run, one comparison per pair of runs.

Every image is embedded as a ``data:`` URI and every plot is drawn here (matplotlib -> PNG), so
a page opens anywhere, offline, as one file. Every figure cell carries ``data-key``: its dotted
path in ``run.json``'s metrics (``evaluate.quality.single.color``), which is what the tests
read back.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from ..tracking import flatten, redact_uri

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:0} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums} .sub{color:#666;font-size:.9em}
.better{background:#e3f6e3} .worse{background:#fbe3e3} .ok{color:#17803d;font-weight:600} .missed{color:#b3261e;font-weight:600}
.note{background:#fff7d6;border:1px solid #e6cf76;padding:8px 12px;border-radius:4px}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top} figcaption{font-size:.85em;color:#555}
img.px{image-rendering:pixelated} .pair{display:flex;gap:24px;align-items:flex-start} code{font-size:.9em}
"""
MAX_ZOOM, TARGET_WIDTH = 3, 900   # small grids are shown enlarged (pixelated: reviewers count pixels)


# ---- pieces ----------------------------------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape(str(x))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(path: Path, alt: str, target_width: int = TARGET_WIDTH) -> str:
    from PIL import Image
    with Image.open(path) as im:
        w, h = im.size
    zoom = max(1, min(MAX_ZOOM, target_width // w))
    return (f'<img class="px" alt="{esc(alt)}" width="{w * zoom}" height="{h * zoom}" '
            f'src="{data_uri(Path(path).read_bytes())}">')


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def cell(flat: dict, key: str) -> str:
    """A figure cell: the value at dotted ``key`` of the run's flattened metrics, tagged with the key."""
    v = flat.get(key)
    cls = "num" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    return f'<td class="{cls}" data-key="{esc(key)}">{esc(fmt(v))}</td>'


def table(head: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    head = list(head)
    top = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" if any(head) else ""
    return f'<table class="{cls}">' + top + "".join(rows) + "</table>"


def curves_png(curves: dict[str, list]) -> Optional[bytes]:
    """One panel per trained stage: train loss against step (log scale)."""
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(curves)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (stage, pts) in zip(axes.flat, curves.items()):
        steps, losses = zip(*pts)
        ax.plot(steps, losses, lw=1)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("train loss", fontsize=8)
        if min(losses) > 0:
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def grid_images(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, path) of the run's grids in a fixed order: prompts per stage, then the rest."""
    imgs = Path(run_dir) / "images"
    prompts = sorted(imgs.glob("prompts_*.png"), key=lambda p: (p.stem != "prompts_decoder", p.stem))
    rest = [imgs / n for n in ("test_real_vs_generated.png",) if (imgs / n).exists()]
    return [(f"prompts after {p.stem.removeprefix('prompts_')}", p) for p in prompts] + \
           [("test captions: real (odd rows) vs generated (even rows)", p) for p in rest]


# ---- the report of one run ----------------------------------------------------------------------------
QUALITY_ROWS = (("one object: color", "single.color"), ("one object: shape", "single.shape"),
                ("one object: size", "single.size"), ("one object: position", "single.position"),
                ("one object: all four", "single.all"), ("two objects: both colors", "pair.colors"),
                ("two objects: colors on their shapes", "pair.shapes"), ("two objects: relation", "pair.relation"),
                ("Fréchet distance (judge features)", "frechet_distance"))
# after every stage, each taken to the final size: where the background's noise comes from
STAGE_BACKGROUND_ROWS = (("background noise (8-bit levels)", "background.noise"),
                         ("background speckle (high-pass)", "background.speckle"))


def identity_rows(run: dict) -> list[str]:
    i = run["identity"]
    ml = i["mlflow"]
    rows = [("run", run["run"]), ("created (UTC)", run["created_utc"]), ("profile", i["profile"]),
            ("git revision", i["git_revision"] + (" (uncommitted changes)" if i["git_dirty"] else "")),
            ("MLflow evaluate run", ml.get("evaluate_run_id")), ("MLflow parent run", ml.get("parent_run_id")),
            ("MLflow store", redact_uri(ml.get("tracking_uri")))]
    return [f"<tr><th>{esc(k)}</th><td><code>{esc(fmt(v))}</code></td></tr>" for k, v in rows]


def lock_rows(run: dict) -> list[str]:
    return [f"<tr><td>{esc(stage)}</td><td><code>{esc(path)}</code></td><td><code>{esc(md5)}</code></td></tr>"
            for stage, outs in run["identity"]["dvc_lock"].items() for path, md5 in outs.items()]


def standard_note(ev: dict) -> str:
    std = ev.get("standard") or {}
    if std.get("metric") == "FID":
        return f'<p>{esc(std["feature_extractor"])}.</p>'
    return ('<p class="note"><b>No Inception weights were given</b> (<code>evaluate.inception_weights</code>), so '
            "these are <b>FD-CLIP / KD-CLIP</b>: Fréchet and kernel distances in the pipeline's own CLIP "
            "image space. They compare runs that share a CLIP; they are not the FID/KID that papers report.</p>")


def report_html(run_dir: Path) -> str:
    from .snapshot import load
    run_dir = Path(run_dir)
    run = load(run_dir)
    m = run["metrics"]
    ev = m.get("evaluate", {})
    mf = flatten(m)                  # every cell reads this one flattening
    out = [*identity_section(run), *quality_section(ev, mf), *standard_sections(ev, mf),
           *curves_section(run), *samples_section(run, ev, run_dir), *worst_section(run, run_dir),
           *every_figure_section(run, m, ev, mf)]
    return page(f"unCLIP report {run['run']}", "\n".join(out))


def identity_section(run: dict) -> list[str]:
    return [f"<h1>unCLIP evaluation report: {esc(run['run'])}</h1>",
            f'<p class="sub">profile <b>{esc(run["identity"]["profile"])}</b>, '
            f'git {esc(run["identity"]["git_revision"][:10])}, {esc(run["created_utc"])} UTC</p>',
            "<h2>Identity</h2>", table(["", ""], identity_rows(run)),
            "<details><summary>dvc.lock hashes of data and models</summary>",
            table(["stage", "path", "md5"], lock_rows(run)), "</details>"]


def verdict(b: dict) -> str:
    """A bar's verdict; a judged miss by less than its standard error says so."""
    if b["ok"]:
        return "reached"
    if b.get("se") and b["value"] is not None and b["bar"] - b["value"] <= b["se"]:
        return f"missed, within its standard error ({b['se']})"
    return "missed"


def quality_section(ev: dict, mf: dict) -> list[str]:
    """Quality, the ablation, the bars (judged: data with ground truth); else what was not measured."""
    out = not_judged_section(ev, mf) if ev.get("ground_truth") is False else judged_section(ev, mf)
    if ev.get("bars"):
        rows = [f"<tr><td>{esc(name)}</td>{cell(mf, f'evaluate.bars.{name}.value')}{cell(mf, f'evaluate.bars.{name}.bar')}"
                f'<td class="{"ok" if b["ok"] else "missed"}">{verdict(b)}</td></tr>'
                for name, b in ev["bars"].items()]
        out += ["<h3>Bars</h3>", table(["figure", "value", "bar", ""], rows)]
    if ev.get("quality_by_stage"):
        stages = list(ev["quality_by_stage"])
        rows = [f"<tr><th>{esc(label)}</th>" + "".join(cell(mf, f"evaluate.quality_by_stage.{s}.{k}") for s in stages)
                + "</tr>" for label, k in QUALITY_ROWS + STAGE_BACKGROUND_ROWS]
        out += ["<h3>After every stage of the cascade</h3>", table(["", *stages], rows)]
    return out


def not_judged_section(ev: dict, mf: dict) -> list[str]:
    abl, nm = ev.get("ablation", {}), ev.get("not_measured", {})
    out = ["<h2>Quality: not judged</h2>",
           f'<p class="note" data-key="evaluate.ground_truth"><b>No ground truth.</b> {esc(nm.get("why", ""))}. '
           "The judge was not trained and these figures were not measured (none is shown as a zero): "
           + ", ".join(f"<code>{esc(k)}</code>" for k in nm.get("figures", []))
           + ". The figures below are those that need no ground truth: FID/KID (or FD-CLIP/KD-CLIP), "
           "the CLIP score and the prior's cosines.</p>"]
    if abl:
        std_name = (ev.get("standard") or {}).get("metric", "FID")
        labels = ((std_name, "standard.fid"), ("KID" if std_name == "FID" else "KD-CLIP", "standard.kid_mean"),
                  ("CLIP score (100·mean cos)", "clip_score"), ("network evaluations per image", "nfe_per_image"),
                  ("seconds per image", "seconds_per_image"))
        rows = [f"<tr><th>{esc(label)}</th>" + "".join(cell(mf, f"evaluate.ablation.{v}.{k}") for v in abl)
                + "</tr>" for label, k in labels]
        out += ["<h3>Ablation (DALL·E 2 §5.1) in these figures</h3>",
                f'<p class="sub">{esc(ev.get("n_captions"))} held-out test captions, one image each, seed '
                f"{esc(ev.get('seed'))}. unclip = prior → decoder; text_embedding = decoder fed z_t; "
                "caption_only = no image embedding.</p>", table(["", *abl], rows, "ablation")]
    return out


def judged_section(ev: dict, mf: dict) -> list[str]:
    """The judged figures on every held-out caption, then the ablation's rows (each variant on the same
    first ``ablation_per_kind`` captions of each kind: ``n_captions``)."""
    abl = ev.get("ablation", {})
    if not abl:
        return []
    keys = ["evaluate.quality"] + [f"evaluate.ablation.{v}" for v in abl]
    n_abl = next(iter(abl.values())).get("n_captions")
    head = ["judged on the final images", "unclip, every caption",
            *(f"{v}, {n_abl} captions" if n_abl else v for v in abl)]
    rows = [f"<tr><th>{esc(label)}</th>" + "".join(cell(mf, f"{key}.{k}") for key in keys) + "</tr>"
            for label, k in QUALITY_ROWS]
    rows.append("<tr><th>network evaluations per image</th>"
                + "".join(cell(mf, f"{key}.nfe_per_image") for key in keys) + "</tr>")
    n = ev.get("quality", {})
    return ["<h2>Quality (the judge, against each caption's truth)</h2>",
            f'<p class="sub">{esc(n.get("single", {}).get("n"))} one-object and {esc(n.get("pair", {}).get("n"))} '
            f"two-object held-out test captions, one image each, seed {esc(ev.get('seed'))}; "
            f"percent right (p % of n captions has a standard error of about √(p(100 − p) / n) points: 1.9 at "
            f"90 % of 256, 2.7 at 90 % of the ablation's 128). The real-versus-real Fréchet floor: "
            f"<b data-key=\"evaluate.frechet_floor_real_vs_real\">{esc(fmt(ev.get('frechet_floor_real_vs_real')))}</b>. "
            "Ablation (DALL·E 2 §5.1), every variant on the same first captions of each kind (the Fréchet "
            "distance grows as the sample shrinks): unclip = prior → decoder; text_embedding = decoder fed z_t; "
            "caption_only = no image embedding.</p>",
            table(head, rows, "quality"), *phrasings_section(ev, mf)]


def phrasings_section(ev: dict, mf: dict) -> list[str]:
    """Captions a user would write: the same scenes in phrasings outside the corpus's templates."""
    ph = ev.get("phrasings")
    if not ph:
        return []
    families = sorted((f for f, row in ph.items() if isinstance(row, dict)), key=lambda f: f != "test_split")
    # each family's figure beside its binomial standard error (evaluate.with_se; none for the Frechet distance)
    rows = [f"<tr><th>{esc(label)}</th>"
            + "".join(cell(mf, f"evaluate.phrasings.{f}.{k}") + cell(mf, f"evaluate.phrasings.{f}.se.{k}")
                      for f in families)
            + "</tr>" for label, k in QUALITY_ROWS]
    examples = "; ".join(f"{esc(f)}: “{esc(ph[f]['example'])}”" for f in families if ph[f].get("example"))
    return ["<h3>Captions a user would write</h3>",
            f'<p class="sub">The first {esc(ph.get("n_captions"))} judged scenes (half one-object), each captioned '
            "by the test split (the corpus's templates) and rephrased outside them (pipeline/phrasings.py), one "
            f"image each, the same seed, judged against the same truth. E.g. {examples}.</p>",
            table(["", *(h for f in families for h in (f, "±"))], rows, "phrasings")]


def standard_sections(ev: dict, mf: dict) -> list[str]:
    """FID/KID (or FD-CLIP/KD-CLIP), the CLIP score in both conventions, the prior's cosines."""
    out = []
    std = ev.get("standard")
    if std:
        keys = ("fid", "fid_floor_real_vs_real", "kid_mean", "kid_std", "n_generated", "n_real", "kid_subsets",
                "kid_subset_size", "seed")
        name = std.get("metric", "FID")
        labels = {"fid": name, "fid_floor_real_vs_real": f"{name}, real vs real (floor)",
                  "kid_mean": "KID" if name == "FID" else "KD-CLIP", "kid_std": "KID std over subsets"}
        out += [f"<h2>Standard metrics: {esc(name)}</h2>", standard_note(ev),
                table(["figure", "value"], [f"<tr><th>{esc(labels.get(k, k))}</th>{cell(mf, f'evaluate.standard.{k}')}</tr>"
                                             for k in keys])]
    conv = ev.get("clip_score_conventions")
    if conv:
        rows = [f"<tr><th>{esc(s)}</th>{cell(mf, f'evaluate.clip_score_conventions.{s}.hessel_2.5')}"
                f"{cell(mf, f'evaluate.clip_score_conventions.{s}.torchmetrics_100')}"
                f"{cell(mf, f'evaluate.clip_score_conventions.{s}.n')}</tr>" for s in conv]
        out += ["<h2>CLIP score (the pipeline's CLIP)</h2>",
                table(["images", "Hessel et al. 2.5·max(cos, 0)", "torchmetrics 100·max(cos, 0)", "n"], rows)]
    prior = ev.get("prior")
    if prior:
        rows = [f"<tr><th>{esc(k)}</th>{cell(mf, f'evaluate.prior.{k}')}</tr>" for k in prior]
        out += ["<h3>Prior cosines on these captions</h3>", table(["figure", "value"], rows)]
    return out


def curves_section(run: dict) -> list[str]:
    png = curves_png(run.get("curves", {}))
    return ["<h2>Training curves</h2>",
            f'<img alt="training curves" src="{data_uri(png)}">' if png else
            "<p class=\"note\">No training curves: the MLflow store had no train_loss history.</p>"]


def samples_section(run: dict, ev: dict, run_dir: Path) -> list[str]:
    params_ev = run["params"].get("evaluate") or {}
    prompts = ev.get("prompts") or params_ev.get("prompts") or params_ev.get("grid_prompts", [])   # older snapshots
    return ["<h2>Samples: fixed prompts and seeds, every stage of the cascade</h2>",
            "<p class=\"sub\">Rows: " + "; ".join(f"{i + 1}. {esc(p)}" for i, p in enumerate(prompts))
            + f" (seeds 0..{esc((run['params'].get('evaluate') or {}).get('grid_seeds', 1) - 1)} across).</p>",
            *(f"<figure>{img_tag(p, label)}<figcaption>{esc(label)}</figcaption></figure>"
              for label, p in grid_images(run_dir))]


def worst_section(run: dict, run_dir: Path) -> list[str]:
    if not run.get("worst"):
        return []
    wpng = run_dir / "images" / "worst.png"
    out = ["<h2>Worst-judged samples</h2>",
           '<p class="sub">Real test image (odd rows) above the generated one (even rows), in the order below.</p>']
    if wpng.exists():
        out.append(f"<figure>{img_tag(wpng, 'worst-judged samples')}</figure>")
    rows = [f"<tr><td class=\"num\">{k + 1}</td><td>{esc(w['caption'])}</td><td class=\"num\">{esc(w['passed'])}</td>"
            f"<td>{esc(', '.join(w['failed']))}</td><td><code>{esc(json.dumps(w['judge_saw']))}</code></td></tr>"
            for k, w in enumerate(run["worst"])]
    return out + [table(["#", "caption", "checks passed", "failed", "the judge saw"], rows)]


def every_figure_section(run: dict, m: dict, ev: dict, mf: dict) -> list[str]:
    flat = {k: v for k, v in flatten(ev).items() if isinstance(v, (int, float, bool, str)) or v is None}
    others = [s for s in m if s != "evaluate"]
    return ["<h2>Every figure of the evaluation</h2>", "<details><summary>metrics/evaluate.json (every figure)</summary>",
            table(["key", "value"], [f"<tr><td><code>{esc(k)}</code></td>{cell(mf, 'evaluate.' + k)}</tr>" for k in flat],
                  "all-metrics"), "</details>",
            "<details><summary>the other stages' metrics</summary>",
            table(["key", "value"], [f"<tr><td><code>{esc(s + '.' + k)}</code></td>{cell(mf, s + '.' + k)}</tr>"
                                     for s in others for k, v in flatten(m[s]).items()
                                     if isinstance(v, (int, float, bool, str)) or v is None]), "</details>",
            "<details><summary>params (resolved profile)</summary><pre>"
            + esc(json.dumps(run["params"], indent=1)) + "</pre></details>"]

"""One page comparing two runs: every figure side by side with its change and whether the change
is better or worse, the same prompts and seeds side by side, and what differs in the config and
in the data and models (dvc.lock)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ..tracking import flatten
from .render import QUALITY_ROWS, esc, fmt, grid_images, identity_rows, img_tag, page, table
from .snapshot import load

# Which way is better, by the figure's dotted key (first match wins). Reference figures (floors,
# real images, shuffled captions, sample sizes, seeds) have no direction: they are context.
NEUTRAL = re.compile(r"(floor|baseline|real_images|real_vs_real|shuffled|unrelated|bicubic|ceiling|"
                     r"\.n$|\.n_|seed|subset|\.bar$|\.steps$|threshold|shards|input|attempted|"
                     r"^evaluate\.sizes|kid_std|\.lr$|\.guidance$)")
LOWER = re.compile(r"(frechet|\.fid$|kid_mean|\.nfe|nfe_|seconds|duration|loss$|noise|\.stray$)")
HIGHER = re.compile(r"(quality|ablation|accuracy|clip_score|cos_pred|cos_reembed|psnr|recall|zero_shot|"
                    r"images_per_s|\.auroc|mismatch_auroc|precision|diversity|fidelity)")


def direction(key: str) -> Optional[str]:
    """'higher', 'lower' or None (no better/worse) for a dotted metrics key."""
    if key.startswith("evaluate.bars."):
        name = key.split(".")[2]
        if not key.endswith(".value"):
            return None
        return "lower" if ("frechet" in name or "network" in name or "noise" in name) else "higher"
    if NEUTRAL.search(key):
        return None
    if LOWER.search(key):
        return "lower"
    if HIGHER.search(key):
        return "higher"
    return None


def verdict(key: str, a: Any, b: Any) -> tuple[str, str]:
    """(css class, word) for the change a -> b of ``key``."""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if not numeric:
        return ("", "same" if a == b else "changed")
    if a == b:
        return ("", "same")
    d = direction(key)
    if d is None:
        return ("", "–")
    better = (b > a) if d == "higher" else (b < a)
    return ("better", "better") if better else ("worse", "worse")


def headline_keys(ev: dict) -> list[str]:
    """The figures a reviewer reads first: judged quality, FID/KID, the final CLIP score, cost."""
    keys = [f"evaluate.quality.{k}" for _, k in QUALITY_ROWS]
    keys += ["evaluate.standard.fid", "evaluate.standard.kid_mean"]
    if ev.get("clip_score"):
        keys.append(f"evaluate.clip_score.{list(ev['clip_score'])[-1]}")
    return keys + ["evaluate.nfe_total", "evaluate.seconds_per_image"]


def tally(ma: dict, mb: dict) -> dict[str, int]:
    fa, fb = flatten(ma), flatten(mb)
    words = [verdict(k, fa[k], fb[k])[1] for k in fa if k in fb and direction(k)]
    return {w: words.count(w) for w in ("better", "worse", "same")}


def metric_rows(ma: dict, mb: dict, only: Optional[list[str]] = None) -> list[str]:
    fa, fb = flatten(ma), flatten(mb)
    keys = [k for k in dict.fromkeys([*fa, *fb])
            if not isinstance(fa.get(k, fb.get(k)), (list, dict)) and not k.endswith(".stage")
            and not k.endswith(".profile")]
    if only is not None:
        keys = [k for k in only if k in fa or k in fb]
    rows = []
    for k in keys:
        a, b = fa.get(k), fb.get(k)
        cls, word = verdict(k, a, b)
        delta = (b - a) if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)) else None
        rows.append(f'<tr class="{cls}" data-key="{esc(k)}"><td><code>{esc(k)}</code></td>'
                    f'<td class="num">{esc(fmt(a))}</td><td class="num">{esc(fmt(b))}</td>'
                    f'<td class="num">{esc(fmt(round(delta, 6)) if delta is not None else "")}</td><td>{esc(word)}</td></tr>')
    return rows


def config_diff(pa: dict, pb: dict) -> list[tuple[str, Any, Any]]:
    fa, fb = flatten(pa), flatten(pb)
    return [(k, fa.get(k), fb.get(k)) for k in dict.fromkeys([*fa, *fb]) if fa.get(k) != fb.get(k)]


def lock_diff(la: dict, lb: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for stage in dict.fromkeys([*la, *lb]):
        oa, ob = la.get(stage, {}), lb.get(stage, {})
        for path in dict.fromkeys([*oa, *ob]):
            if oa.get(path) != ob.get(path):
                rows.append((stage, path, oa.get(path, "–"), ob.get(path, "–")))
    return rows


def compare_html(dir_a: Path, dir_b: Path) -> str:
    a, b = load(dir_a), load(dir_b)
    ev_a, ev_b = a["metrics"].get("evaluate", {}), b["metrics"].get("evaluate", {})
    out = [f"<h1>unCLIP runs compared: {esc(a['run'])} → {esc(b['run'])}</h1>",
           '<p class="sub">A is the reference (e.g. the model in use), B the candidate; Δ = B − A. '
           'Green: B is better on that figure; red: B is worse; "–": a reference figure with no better or worse.</p>',
           '<div class="pair">', "<div><h3>A</h3>" + table(["", ""], identity_rows(a)) + "</div>",
           "<div><h3>B</h3>" + table(["", ""], identity_rows(b)) + "</div>", "</div>"]

    ext_a, ext_b = (ev_a.get("standard") or {}).get("metric"), (ev_b.get("standard") or {}).get("metric")
    if ext_a != ext_b:
        out.append(f'<p class="note">A reports {esc(ext_a)} and B {esc(ext_b)}: those two figures are not comparable.</p>')
    diff = config_diff(a["params"], b["params"])
    out += ["<h2>Config differences</h2>",
            table(["key", "A", "B"], [f"<tr><td><code>{esc(k)}</code></td><td>{esc(fmt(x))}</td><td>{esc(fmt(y))}</td></tr>"
                                      for k, x, y in diff], "config-diff") if diff else "<p>None: same params.</p>"]
    ld = lock_diff(a["identity"]["dvc_lock"], b["identity"]["dvc_lock"])
    out += ["<h3>Data and models that differ (dvc.lock)</h3>",
            table(["stage", "path", "A md5", "B md5"],
                  [f"<tr><td>{esc(s)}</td><td><code>{esc(p)}</code></td><td><code>{esc(x)}</code></td>"
                   f"<td><code>{esc(y)}</code></td></tr>" for s, p, x, y in ld]) if ld else "<p>None: same hashes.</p>"]

    ma, mb = {"evaluate": ev_a}, {"evaluate": ev_b}
    t = tally(ma, mb)
    out += ["<h2>Headline</h2>",
            f'<p>Of the evaluation\'s figures that have a better direction, B is <b class="ok">better on {t["better"]}</b>, '
            f'<b class="missed">worse on {t["worse"]}</b> and the same on {t["same"]}.</p>',
            table(["figure", "A", "B", "Δ", "B vs A"], metric_rows(ma, mb, headline_keys(ev_b or ev_a)), "headline"),
            "<h2>The evaluation, figure by figure</h2>",
            table(["figure", "A", "B", "Δ", "B vs A"], metric_rows(ma, mb), "metrics")]

    out.append("<h2>Same prompts, same seeds</h2>")
    ga, gb = dict((lbl, p) for lbl, p in grid_images(dir_a)), dict((lbl, p) for lbl, p in grid_images(dir_b))
    for label in dict.fromkeys([*ga, *gb]):
        out.append(f"<h3>{esc(label)}</h3><div class=\"pair\">")
        for side, g in (("A", ga), ("B", gb)):
            out.append(f"<figure>{img_tag(g[label], f'{side}: {label}', target_width=600)}<figcaption>{side}</figcaption></figure>"
                       if label in g else f"<p>{side}: none</p>")
        out.append("</div>")

    others_a = {k: v for k, v in a["metrics"].items() if k != "evaluate"}
    others_b = {k: v for k, v in b["metrics"].items() if k != "evaluate"}
    out += ["<details><summary>every other stage's figures</summary>",
            table(["figure", "A", "B", "Δ", "B vs A"], metric_rows(others_a, others_b), "metrics-other"), "</details>"]
    return page(f"unCLIP compare {a['run']} vs {b['run']}", "\n".join(out))

"""One page comparing two runs: every figure side by side with its change and whether the change
is better or worse, the same prompts and seeds side by side, and what differs in the config and
in the data and models (dvc.lock).

A judged percentage is a count out of n captions, so a change smaller than its sampling noise is
neither better nor worse: such a change reads "within noise" (:func:`noise_band`). The page also says
where two runs' models were trained at different thread counts: a step's sums depend on the thread
count, so such models are different draws of one config even where every parameter is the same."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

from ..tracking import flatten
from .render import QUALITY_ROWS, esc, fmt, grid_images, identity_rows, img_tag, page, table
from .snapshot import load

# Which way is better, by the figure's dotted key (first match wins). Reference figures (floors,
# real images, shuffled captions, sample sizes, seeds) have no direction: they are context.
NEUTRAL = re.compile(r"(floor|baseline|real_images|real_vs_real|shuffled|unrelated|bicubic|ceiling|"
                     r"\.n$|\.n_|\.se\.|seed|subset|\.bar$|\.steps$|threshold|shards|input|attempted|"
                     r"^evaluate\.sizes|kid_std|\.lr$|\.guidance$)")
LOWER = re.compile(r"(frechet|\.fid$|kid_mean|\.nfe|nfe_|seconds|duration|loss$|noise|\.stray$)")
HIGHER = re.compile(r"(quality|ablation|phrasings|accuracy|clip_score|cos_pred|cos_reembed|psnr|recall|zero_shot|"
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


def verdict(key: str, a: Any, b: Any, band: Optional[float] = None) -> tuple[str, str]:
    """(css class, word) for the change a -> b of ``key``; a change of at most ``band`` (the noise
    of a judged percentage, :func:`noise_band`) is "within noise"."""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if not numeric:
        return ("", "same" if a == b else "changed")
    if a == b:
        return ("", "same")
    d = direction(key)
    if d is None:
        return ("", "–")
    if band is not None and abs(b - a) <= band:
        return ("", "within noise")
    better = (b > a) if d == "higher" else (b < a)
    return ("better", "better") if better else ("worse", "worse")


def judged_n(flat: dict, key: str) -> Optional[int]:
    """How many captions a judged percentage at dotted ``key`` counts: the ``n`` beside a
    ``single``/``pair`` figure, ``n_named`` beside the named background's; for a bar's value, the
    figure it reads. None for any other figure."""
    parent, _, leaf = key.rpartition(".")
    if parent.startswith("evaluate.bars.") and leaf == "value":     # "single shape": evaluate.quality.single.shape
        kind, _, figure = parent.removeprefix("evaluate.bars.").partition(" ")
        if kind == "background" and figure.startswith("named"):
            parent, leaf = "evaluate.quality.background", "named_right"
        elif kind in ("single", "pair"):
            parent, leaf = f"evaluate.quality.{kind}", figure
        else:
            return None
    if leaf == "named_right":
        n = flat.get(f"{parent}.n_named")
    elif parent.endswith((".single", ".pair")) and not leaf.startswith("n"):
        n = flat.get(f"{parent}.n")
    else:
        return None
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 else None


def noise_band(flat_a: dict, flat_b: dict, key: str) -> Optional[float]:
    """Two standard errors, in points, of the difference between two runs' judged percentage at
    ``key`` (each a count out of its n captions, sampled independently; Agresti-Coull's estimate,
    (k + 2) / (n + 4), so that 100 % of n still has an error): 5.4 points for 90 % of 256 against
    90 % of 256. Two trainings of one config differ by about 4 points of their judged figures
    (docs/MEASURED.md, eighteenth session). None where ``key`` is not a judged percentage."""
    na, nb = judged_n(flat_a, key), judged_n(flat_b, key)
    a, b = flat_a.get(key), flat_b.get(key)
    if not (na and nb) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
        return None

    def var(pct: float, n: int) -> float:
        p = (pct / 100 * n + 2) / (n + 4)
        return p * (1 - p) / (n + 4)
    return 200 * math.sqrt(var(a, na) + var(b, nb))


def headline_keys(ev: dict) -> list[str]:
    """The figures a reviewer reads first: judged quality, FID/KID, the final CLIP score, cost."""
    keys = [f"evaluate.quality.{k}" for _, k in QUALITY_ROWS]
    keys += ["evaluate.standard.fid", "evaluate.standard.kid_mean"]
    if ev.get("clip_score"):
        keys.append(f"evaluate.clip_score.{list(ev['clip_score'])[-1]}")
    return keys + ["evaluate.nfe_total", "evaluate.seconds_per_image"]


def tally(ma: dict, mb: dict) -> dict[str, int]:
    fa, fb = flatten(ma), flatten(mb)
    words = [verdict(k, fa[k], fb[k], noise_band(fa, fb, k))[1] for k in fa if k in fb and direction(k)]
    return {w: words.count(w) for w in ("better", "worse", "within noise", "same")}


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
        band = noise_band(fa, fb, k)
        cls, word = verdict(k, a, b, band)
        delta = (b - a) if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)) else None
        rows.append(f'<tr class="{cls}" data-key="{esc(k)}"><td><code>{esc(k)}</code></td>'
                    f'<td class="num">{esc(fmt(a))}</td><td class="num">{esc(fmt(b))}</td>'
                    f'<td class="num">{esc(fmt(round(delta, 6)) if delta is not None else "")}</td>'
                    f'<td class="num">{esc(f"{band:.1f}") if band is not None else ""}</td><td>{esc(word)}</td></tr>')
    return rows


def thread_rows(ma: dict, mb: dict) -> list[str]:
    """One row per training stage whose thread counts (``train.threads``: [[step, threads], ...], the
    steps where they changed) differ between the two runs."""
    rows = []
    for stage in dict.fromkeys([*ma, *mb]):
        ta, tb = ((m.get(stage) or {}).get("train", {}).get("threads") for m in (ma, mb))
        if ta is not None and tb is not None and ta != tb:
            rows.append(f'<tr data-key="{esc(stage)}.train.threads"><td>{esc(stage)}</td><td>{esc(_threads(ta))}</td>'
                        f"<td>{esc(_threads(tb))}</td></tr>")
    return rows


def _threads(history: list) -> str:
    return ", ".join(f"{n} from step {step}" for step, n in history)


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
    head = ["figure", "A", "B", "Δ", "noise (2 SE)", "B vs A"]
    out += ["<h2>Headline</h2>",
            f'<p>Of the evaluation\'s figures that have a better direction, B is <b class="ok">better on {t["better"]}</b>, '
            f'<b class="missed">worse on {t["worse"]}</b>, within the judged sample\'s noise on {t["within noise"]} '
            f'and the same on {t["same"]}.</p>',
            '<p class="sub">A judged percentage counts n captions: its change reads "within noise" where it is at '
            "most two standard errors of the difference of two samples of those sizes (the column noise). Two "
            "trainings of one config differ by about that much.</p>",
            table(head, metric_rows(ma, mb, headline_keys(ev_b or ev_a)), "headline"),
            "<h2>The evaluation, figure by figure</h2>",
            table(head, metric_rows(ma, mb), "metrics")]
    threads = thread_rows(a["metrics"], b["metrics"])
    if threads:
        out += ["<h3>Trained at other thread counts</h3>",
                '<p class="note">These models were trained at different thread counts (a stage beside another '
                "gets one core and takes both back when it ends, at a step that depends on the machine's speed). "
                "A step's sums depend on the thread count, so they are different draws even of one config: part of "
                "any difference above is that draw.</p>",
                table(["stage", "A: threads", "B: threads"], threads, "threads")]

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
            table(head, metric_rows(others_a, others_b), "metrics-other"), "</details>"]
    return page(f"unCLIP compare {a['run']} vs {b['run']}", "\n".join(out))

"""Your own data, end to end: a URL list without ground truth (every image format and caption kind
of tests/helpers/own_data.py, served over loopback) through the Prefect flow, crawl to gate, on the
smoke profile, in a fresh workspace where only crawl.url_list (plus crawl.allow_private_hosts: the site is on loopback, and the grids' prompts) are set."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers.own_data import MISSING, STYLES, build_site, static_server
from pipeline import truth
from pipeline.data import filter as filt
from pipeline.data.shards import iter_samples, sample_meta, shard_paths
from pipeline.report import runs
from pipeline.stages import STAGES
from pipeline.workspace import Workspace, init_workspace

pytestmark = pytest.mark.slow
N_IMAGES = 330              # 30 of each of the 11 formats; + MISSING URLs that answer 404
PROMPTS = ["a large red disc, center", "🐱 a small blue square, top left 🎨"]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def own_flow(prefect_api, tmp_path_factory):
    from flows.train import train_flow
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)     # the workspace's own sqlite store
    tmp = tmp_path_factory.mktemp("own")
    rows = build_site(tmp / "site", N_IMAGES)
    root = init_workspace(tmp / "ws")
    params = (root / "params.yaml").read_text()
    assert "  url_list: null" in params and "  prompts: null" in params
    assert "  allow_private_hosts: false" in params
    params = params.replace("  url_list: null", "  url_list: my_pairs.parquet", 1)
    # the list names this machine's loopback server: the opt-in such a list needs (SECURITY.md)
    params = params.replace("  allow_private_hosts: false", "  allow_private_hosts: true", 1)
    params = params.replace("  prompts: null", f"  prompts: {json.dumps(PROMPTS, ensure_ascii=False)}", 1)
    (root / "params.yaml").write_text(params)
    with static_server(tmp / "site") as base:
        table = pd.DataFrame({"url": [f"{base}/{r['path']}" for r in rows], "caption": [r["caption"] for r in rows]})
        table.to_parquet(root / "my_pairs.parquet", index=False)       # no key, no split, no ground truth
        t0 = time.perf_counter()
        summary = train_flow(workspace=str(root), profile="smoke")
        seconds = time.perf_counter() - t0
    print(f"own-data flow: {seconds:.0f} s")
    yield Workspace.at(root), pd.DataFrame(rows).assign(url=table.url), summary
    mp.undo()


def metrics(ws, stage):
    return json.loads(ws.metrics_path(stage).read_text())


def test_flow_runs_crawl_to_gate_and_skips_what_needs_ground_truth(own_flow):
    ws, _, summary = own_flow
    status = {r["stage"]: r["status"] for r in summary["stages"]}
    assert list(status) == [*STAGES, "promote"]
    assert status.pop("corpus") == status.pop("judge") == "n/a"
    assert status.pop("promote") == "promoted" and set(status.values()) == {"ran"}, summary["stages"]
    assert truth.skipped(ws.corpus).startswith("crawl.url_list is set") and not (ws.corpus / "pairs.parquet").exists()
    assert metrics(ws, "judge")["skipped"] == truth.NO_TRUTH and not (ws.judge / "model.safetensors").exists()
    gate = summary["stages"][-1]["figures"]
    assert gate["rule_set"] == "promote.rules_without_ground_truth" and gate["version"] == 1


def test_every_url_is_kept_or_dropped_by_reason(own_flow):
    ws, rows, _ = own_flow
    crawl, fil, emb = metrics(ws, "crawl"), metrics(ws, "filter"), metrics(ws, "embed")
    # crawl: every format fetched; the missing files answer 404
    assert crawl["attempted"] == len(rows) == N_IMAGES + MISSING
    assert crawl["succeeded"] == N_IMAGES and crawl["failed_by_reason"]["http_404"] == MISSING
    assert sum(crawl["failed_by_reason"].values()) == MISSING
    assert sum(crawl["split_by_url"].values()) == len(rows) and min(crawl["split_by_url"].values()) > 0
    log = pd.read_parquet(ws.raw / "crawl_log.parquet")
    assert sorted(log.url) == sorted(rows.url)
    # filter: every crawled sample kept or dropped once, by reason
    dropped = pd.read_parquet(ws.filtered / filt.DROPPED)
    kept = {s["__key__"]: s for s in iter_samples(shard_paths(ws.filtered))}
    success = set(log.key[log.status == "success"])
    assert set(kept) | set(dropped.key) == success and not set(kept) & set(dropped.key)
    assert fil["input"] == N_IMAGES == fil["kept"] + sum(fil["dropped_by_reason"].values())
    by_url = rows.set_index("url")
    key_row = by_url.loc[log.url[log.status == "success"]].assign(key=log.key[log.status == "success"].values)
    small = key_row.kind == "too_small"
    assert fil["dropped_by_reason"]["too_small"] == small.sum() > 0
    assert fil["dropped_by_reason"]["caption_empty"] == ((key_row.caption == "") & ~small).sum() > 0
    assert set(dropped.key[dropped.reason == "too_small"]) == set(key_row.key[small])
    # one word, Unicode and emoji captions are kept; the long one too, cut at CLIP's context and counted
    style = dict(zip(key_row.key, key_row["style"]))
    kept_styles = {style[k] for k in kept}
    assert kept_styles == set(STYLES) - {"empty"}
    assert all(kept[k]["txt"].decode() == c for k, c in zip(key_row.key, key_row.caption) if k in kept)
    assert emb["captions_truncated"] == sum(style[k] == "long" for k in kept) > 0
    # every kept image is square; the wide and the EXIF-rotated ones were made so
    non_square = key_row.kind.isin(["nonsquare", "jpeg_exif_rotated"]) & key_row.key.isin(list(kept))
    assert fil["squared"] == {"center_crop": int(non_square.sum())} and non_square.sum() > 0
    assert all(sample_meta(kept[k])["square"]["policy"] == "center_crop" for k in key_row.key[non_square])
    # embed: no similarity threshold in the smoke profile, so all of them
    assert emb["input"] == fil["kept"] == emb["kept"]
    splits = {sample_meta(s)["split"] for s in kept.values()}
    assert splits == {"train", "val", "test"}


def test_evaluation_without_ground_truth_says_so(own_flow):
    ws, _, _ = own_flow
    ev = metrics(ws, "evaluate")
    assert ev["ground_truth"] is False and ev["not_measured"]["why"] == truth.NO_TRUTH
    assert not set(truth.NOT_MEASURED) & set(ev)               # no judged figure, not even a zero
    std = ev["standard"]
    # the first n_single + n_pair (6) test captions, or all of them: a list without keys splits by its URLs' hash,
    # and the loopback server's port is new every run, so the test split holds about 12 pairs, sometimes fewer
    n_test = metrics(ws, "embed")["kept_by_split"]["test"]["kept"]
    assert std["metric"] == "FD-CLIP" and std["fid"] > 0 and std["n_generated"] == ev["n_captions"] == min(6, n_test)
    assert set(ev["ablation"]) == {"unclip", "text_embedding", "caption_only"}
    for a in ev["ablation"].values():
        assert a["standard"]["fid"] > 0 and -100 <= a["clip_score"] <= 100 and a["nfe_per_image"] > 0
    assert ev["ablation"]["unclip"]["standard"]["fid"] == std["fid"]
    assert ev["clip_score_final"] == ev["clip_score"]["upsample_2"]
    assert ev["prior"]["n"] == 6 and "cos_pred_image" in ev["prior"]
    assert ev["prompts"] == PROMPTS
    grids = ws.reports / "evaluate"
    assert json.loads((grids / "prompts.json").read_text())["prompts"] == PROMPTS
    assert {p.name for p in grids.glob("*.png")} >= {"prompts_decoder.png", "prompts_upsample_2.png",
                                                      "test_real_vs_generated.png"}
    assert not (grids / "worst.png").exists() and not (grids / "diversity.png").exists()


def test_report_shows_the_figures_and_says_what_was_not_judged(own_flow):
    ws, _, _ = own_flow
    (run,) = runs(ws)
    page = (run / "report.html").read_text()
    ev = json.loads((run / "run.json").read_text())["metrics"]["evaluate"]
    assert "No ground truth." in page and "Quality: not judged" in page
    assert 'data-key="evaluate.standard.fid"' in page and "FD-CLIP" in page
    assert 'data-key="evaluate.ablation.caption_only.clip_score"' in page
    assert "clip_score_final" in page and f"{ev['clip_score_final']:.6g}" in page
    assert PROMPTS[1] in page                                   # the user's prompts label the grids
    assert "two objects: relation" not in page                    # no judged table of dashes

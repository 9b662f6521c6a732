"""Standard metrics (FID/KID through torchmetrics, CLIP score conventions), worst samples, and the
report / comparison pages on a synthetic evaluation, opened in headless Chromium."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.quality import clip_scores, fid_kid, frechet_distance, worst_samples
from pipeline.report.compare import direction, judged_n, noise_band, verdict
from pipeline.tracking import flatten

from helpers.browser import open_page
from helpers.fake_eval import fake_evaluation


def _kid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018), whole sets."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3            # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_fid_and_kid_match_torchmetrics_and_independent_computations():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 6)), rng.normal(0.4, 1.3, size=(60, 6))
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy_linalg.sqrtm(s_a @ s_b).real)
    # one subset of every sample: KID's subset is then the whole set, whatever the draw
    out = fid_kid(torch.from_numpy(a), torch.from_numpy(b), seed=0, subsets=1, subset_size=60)
    assert out["fid"] == pytest.approx(ref, rel=1e-3) == pytest.approx(frechet_distance(a, b), rel=1e-3)
    assert out["kid_mean"] == pytest.approx(_kid_reference(b, a), abs=1e-5)
    assert out["kid_subset_size"] == 60 and out["kid_subsets"] == 1
    # same features -> FID 0; seeded subsets -> the same KID twice
    assert fid_kid(torch.from_numpy(a), torch.from_numpy(a), seed=0, kid=False)["fid"] == pytest.approx(0, abs=1e-6)
    k1 = fid_kid(torch.from_numpy(a), torch.from_numpy(b), seed=3, subsets=5, subset_size=20)
    k2 = fid_kid(torch.from_numpy(a), torch.from_numpy(b), seed=3, subsets=5, subset_size=20)
    assert k1 == k2 and k1["kid_std"] > 0


def test_clip_score_in_both_conventions():
    cos = torch.tensor([0.4, 0.2, -0.3])
    out = clip_scores(cos)
    assert out == {"hessel_2.5": pytest.approx(2.5 * 0.2), "torchmetrics_100": pytest.approx(20.0), "n": 3}


def test_inception_features_load_a_local_weights_file_and_a_missing_one_fails_clearly(tmp_path, monkeypatch):
    """The standard FID path, wired with randomly initialised weights saved to a file (the real
    torch-fidelity file is not in the repo: no downloads)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from pipeline.quality import InceptionFeatures, extract
    with pytest.raises(FileNotFoundError, match="inception_weights.*not a file"):
        InceptionFeatures(str(tmp_path / "pt_inception.pth"))
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:              # build the architecture once without any weights
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)
    ext = InceptionFeatures(str(weights))
    feats = extract(ext, torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    assert feats.shape == (3, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    assert ext.name == "FID" and "Inception" in ext.description


def test_worst_samples_are_the_fewest_checks_passed():
    from pipeline.judge.labels import HEADS, VOCAB, targets
    gt = {"objects": [{"color": "red", "shape": "circle", "size": "small", "position": "top left"}],
          "background": VOCAB["background"][0]}
    right = dict(zip(HEADS, targets(gt)))
    wrong_shape = right | {"shape": (right["shape"] + 1) % len(VOCAB["shape"])}
    wrong_count = right | {"count": (right["count"] + 1) % len(VOCAB["count"])}
    worst = worst_samples([right, wrong_shape, wrong_count], [gt] * 3, k=2)
    assert [w["index"] for w in worst] == [2, 1]
    assert worst[1]["failed"] == ["shape"] and worst[0]["passed"] == 0.0
    assert worst[1]["judge_saw"]["objects"][0]["color"] == "red"


def test_directions_of_figures():
    assert direction("evaluate.quality.single.color") == "higher"
    assert direction("evaluate.standard.fid") == "lower" and direction("evaluate.quality.frechet_distance") == "lower"
    assert direction("evaluate.standard.fid_floor_real_vs_real") is None
    assert direction("evaluate.frechet_floor_real_vs_real") is None and direction("evaluate.seed") is None
    assert direction("evaluate.nfe_total") == "lower" and direction("evaluate.clip_score.upsample_2") == "higher"
    assert direction("evaluate.bars.pair relation.value") == "higher"
    assert direction("evaluate.bars.frechet within 3x floor.value") == "lower"
    assert direction("evaluate.phrasings.reordered.pair.relation") == "higher"
    assert direction("evaluate.phrasings.reordered.se.pair.relation") is None      # its standard error
    assert verdict("evaluate.standard.fid", 10.0, 8.0) == ("better", "better")
    assert verdict("evaluate.quality.single.shape", 60.0, 50.0) == ("worse", "worse")
    assert verdict("evaluate.seed", 0, 1) == ("", "–")
    assert verdict("evaluate.quality.single.shape", 90.0, 92.0, band=5.4) == ("", "within noise")
    assert verdict("evaluate.quality.single.shape", 90.0, 96.0, band=5.4) == ("better", "better")


def test_a_judged_percentage_changes_only_beyond_its_sampling_noise():
    def run(shape, named, n=256):
        return flatten({"evaluate": {"quality": {"single": {"n": n, "shape": shape}, "frechet_distance": 140.0,
                                                 "background": {"n_named": 109, "named_right": named, "noise": 1.9}},
                                     "ablation": {"caption_only": {"single": {"n": 128, "shape": shape}}},
                                     "bars": {"single shape": {"value": shape}, "network evaluations": {"value": 28},
                                              "background named right": {"value": named}}}})
    a, b = run(90.0, 100.0), run(92.0, 99.08)
    assert judged_n(a, "evaluate.quality.single.shape") == judged_n(a, "evaluate.bars.single shape.value") == 256
    assert judged_n(a, "evaluate.ablation.caption_only.single.shape") == 128
    assert judged_n(a, "evaluate.quality.background.named_right") == 109
    assert judged_n(a, "evaluate.bars.background named right.value") == 109
    for key in ("evaluate.quality.single.n", "evaluate.quality.frechet_distance", "evaluate.quality.background.noise",
                "evaluate.bars.network evaluations.value"):
        assert judged_n(a, key) is None and noise_band(a, b, key) is None, key
    # two standard errors of the difference of two binomial samples (Agresti-Coull), in points
    p = (0.90 * 256 + 2) / 260
    assert noise_band(a, a, "evaluate.quality.single.shape") == pytest.approx(200 * (2 * p * (1 - p) / 260) ** 0.5)
    assert 5.0 < noise_band(a, b, "evaluate.quality.single.shape") < 5.6
    assert noise_band(a, a, "evaluate.quality.background.named_right") > 0      # 100 % of 109 still has an error
    assert noise_band(a, b, "evaluate.ablation.caption_only.single.shape") > noise_band(a, b, "evaluate.quality.single.shape")
    assert noise_band(run(90.0, 100.0, n=4096), run(92.0, 100.0, n=4096), "evaluate.quality.single.shape") < 2.0


# ---- the pages, on a synthetic evaluation --------------------------------------------------------------
def test_report_and_comparison_pages_in_a_browser(tmp_path, smoke_cfg, monkeypatch):
    from pipeline import report
    from pipeline.report.snapshot import snapshot
    from pipeline.workspace import Workspace
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ws = Workspace.at(tmp_path / "ws")
    ws.root.mkdir()
    a_fig = fake_evaluation(ws, seed=0, color=90.0, fid=20.0, n=2000)
    ws.metrics_path("decoder").write_text(json.dumps({"train": {"threads": [[0, 1], [578, 2]]}}))
    run_a = snapshot(smoke_cfg, ws, evaluate_run_id="aaaaaaaa1111")
    b_cfg = smoke_cfg.model_copy(update={"evaluate": smoke_cfg.evaluate.model_copy(update={"seed": 1})})
    b_fig = fake_evaluation(ws, seed=1, color=96.0, fid=25.0, shape=51.0, n=2000)
    ws.metrics_path("decoder").write_text(json.dumps({"train": {"threads": [[0, 1], [469, 2]]}}))
    run_b = snapshot(b_cfg, ws, evaluate_run_id="bbbbbbbb2222")
    assert [p.name for p in report.runs(ws)] == [run_a.name, run_b.name]
    assert report.find(ws, "latest") == run_b and report.find(ws, "previous") == run_a
    with pytest.raises(report.ReportError, match="not found"):
        report.find(ws, "nope")

    page = report.build(ws, "latest")
    seen = open_page(page, tmp_path / "report.png")
    assert seen["images"] and all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    for key, value in flatten(b_fig).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert f"evaluate.{key}" in seen["cells"], key
            assert float(seen["cells"][f"evaluate.{key}"]) == pytest.approx(value), key
    assert (tmp_path / "report.png").stat().st_size > 10_000

    cmp_page = report.compare(ws, run_a.name, run_b.name)
    seen = open_page(cmp_page, tmp_path / "compare.png")
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]) and len(seen["images"]) == 2 * 3
    rows = {r["key"]: r for r in seen["rows"]}
    color = rows["evaluate.quality.single.color"]
    assert color["cls"] == "better" and color["cells"][1:4] == ["90", "96", "6"]
    shape = rows["evaluate.quality.single.shape"]      # 1 point of 2,000 captions at 50 %: inside 3.2 points of noise
    assert shape["cls"] == "" and shape["cells"][4:] == ["3.2", "within noise"]
    assert rows["evaluate.standard.fid"]["cls"] == "worse"
    assert rows["evaluate.standard.fid_floor_real_vs_real"]["cls"] == ""
    html = cmp_page.read_text()
    assert "evaluate.seed" in html and "config-diff" in html
    assert "Trained at other thread counts" in html and "1 from step 0, 2 from step 469" in html   # the decoder's draw
    assert rows["evaluate.phrasings.reordered.single.shape"]["cells"][-1] == "within noise"    # 30 -> 31 of 2,000
    assert rows["evaluate.phrasings.reordered.single.color"]["cls"] == "better"                 # 89 -> 95
    assert rows["evaluate.phrasings.reordered.se.single.color"]["cls"] == ""      # a standard error: no better/worse
    assert "Captions a user would write" in page.read_text() and "red circle, small, at the top" in page.read_text()
    assert a_fig["quality"]["single"]["color"] == 90.0

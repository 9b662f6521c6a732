"""End to end: the Prefect flow runs every stage through DVC in a fresh git workspace, records
MLflow runs, publishes its summary, and a second run does nothing."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from pipeline.data.shards import count_samples, shard_paths
from pipeline.stages import STAGES
from pipeline.workspace import Workspace, init_workspace

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_runs(prefect_api, tmp_path_factory):
    from flows.train import train_flow
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)     # the workspace's own sqlite store
    root = init_workspace(tmp_path_factory.mktemp("e2e") / "ws")
    first = train_flow(workspace=str(root), profile="smoke")
    second = train_flow(workspace=str(root), profile="smoke")
    yield Workspace.at(root), first, second
    mp.undo()


def test_first_run_runs_every_stage(flow_runs):
    ws, first, _ = flow_runs
    assert [r["stage"] for r in first["stages"]] == list(STAGES) + ["promote"]
    assert list(STAGES)[-5:] == ["prior", "decoder", "upsample@1", "upsample@2", "evaluate"]
    assert all(r["status"] == "ran" for r in first["stages"][:-1]), first["stages"]
    # the gate after a new evaluation: the first bundle has no champion to beat
    gate = first["stages"][-1]
    assert gate["status"] == "promoted" and gate["figures"]["version"] == 1, gate
    assert (ws.root / "dvc.lock").exists()


def test_second_run_does_nothing(flow_runs):
    _, _, second = flow_runs
    assert all(r["status"] == "skipped" for r in second["stages"]), second["stages"]


def test_counts_reconcile_and_shards_hold_them(flow_runs):
    ws, _, _ = flow_runs
    crawl = json.loads(ws.metrics_path("crawl").read_text())
    assert crawl["attempted"] == crawl["succeeded"] + sum(crawl["failed_by_reason"].values())
    assert crawl["fault_urls_in_shards"] == 0
    assert sum(count_samples(p) for p in shard_paths(ws.raw)) == crawl["succeeded"]
    filt = json.loads(ws.metrics_path("filter").read_text())
    assert filt["input"] == crawl["succeeded"]
    assert filt["input"] == filt["kept"] + sum(filt["dropped_by_reason"].values())
    assert sum(count_samples(p) for p in shard_paths(ws.filtered)) == filt["kept"]
    emb = json.loads(ws.metrics_path("embed").read_text())
    assert emb["input"] == filt["kept"] == emb["kept"] + emb["dropped_low_similarity"]
    assert sum(count_samples(p) for p in shard_paths(ws.embeddings)) == emb["kept"]


def test_mlflow_has_a_parent_and_one_nested_run_per_stage(flow_runs):
    ws, first, second = flow_runs
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("unclip-pipeline")
    runs = client.search_runs([exp.experiment_id])
    parents = {first["mlflow_parent_run_id"], second["mlflow_parent_run_id"]}
    assert parents <= {r.info.run_id for r in runs}
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["mlflow_parent_run_id"]]
    assert sorted(r.data.tags["stage"] for r in nested) == sorted([*STAGES, "promote"])
    assert not [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second["mlflow_parent_run_id"]]
    by_stage = {r.data.tags["stage"]: r for r in nested}
    assert by_stage["clip"].data.params["batch_size"] == "32"
    assert "val.zero_shot.color_acc" in by_stage["clip"].data.metrics
    assert "train_loss" in by_stage["clip"].data.metrics
    assert by_stage["crawl"].data.metrics["attempted"] > 0
    artifacts = {a.path for a in client.list_artifacts(by_stage["corpus"].info.run_id, "corpus")}
    assert "corpus/samples.png" in artifacts
    assert {a.path for a in client.list_artifacts(by_stage["clip"].info.run_id, "clip")} >= {"clip/clip_figures.png"}


def test_generative_half_trained_and_evaluated(flow_runs):
    ws, _, _ = flow_runs
    for d in (ws.prior, ws.decoder, ws.upsampler("1"), ws.upsampler("2")):
        assert (d / "model.safetensors").exists() and (d / "model.json").exists()
    meta = json.loads((ws.decoder / "model.json").read_text())
    assert meta["clip"]["sha256"] and meta["versions"]["torch"] and meta["config"]["decoder"]["image_size"] == 8
    prior = json.loads(ws.metrics_path("prior").read_text())["val"]
    assert {"cos_pred_image", "cos_pred_text", "cos_image_text_baseline", "cos_unrelated_image"} <= set(prior)
    ev = json.loads(ws.metrics_path("evaluate").read_text())
    assert ev["sizes"] == [8, 16, 32] and set(ev["clip_score"]) == {"decoder", "upsample_1", "upsample_2"}
    assert ev["prior"]["n"] == ev["n_captions"] == 6 and ev["n_single"] == 3
    # judged: per-attribute figures for the final images, every stage, every ablation, and the bars
    assert set(ev["ablation"]) == {"unclip", "text_embedding", "caption_only"}
    for figures in [ev["quality"], *ev["quality_by_stage"].values()]:
        assert figures["single"]["n"] == 3 and figures["pair"]["n"] == 3
    # the ablation: every variant, unCLIP's row included, on the first ablation_per_kind (2) captions of each kind
    for figures in ev["ablation"].values():
        assert figures["single"]["n"] == 2 and figures["pair"]["n"] == 2 and figures["n_captions"] == 4
    for figures in [ev["quality"], *ev["ablation"].values(), *ev["quality_by_stage"].values()]:
        assert 0 <= figures["single"]["shape"] <= 100 and 0 <= figures["pair"]["relation"] <= 100
        assert figures["frechet_distance"] >= 0
    # the smoke judge (6 steps) can leave its ReLU features dead, so the floor may be exactly 0 here;
    # the bar then reads "not measurable" (None), never a division by zero
    floor, fd_bar = ev["frechet_floor_real_vs_real"], ev["bars"]["frechet within 3x floor"]
    assert floor >= 0 and (fd_bar["value"] is None) == (floor == 0) and fd_bar["ok"] == (
        floor > 0 and ev["quality"]["frechet_distance"] <= 3 * floor)
    assert ev["bars"]["network evaluations"]["value"] == ev["nfe_total"]
    assert ev["ablation"]["text_embedding"]["nfe_per_image"] < ev["ablation"]["unclip"]["nfe_per_image"]
    # the background read from pixels (right on every real test image) and its noise; diversity
    real_bg = ev["background_real_images"]
    assert real_bg["read_right"] == 100.0 and 0 <= real_bg["noise"] < 1.5
    for figures in ev["ablation"].values():
        bg = figures["background"]
        assert bg["noise_ratio"] == pytest.approx(bg["noise"] / max(real_bg["noise"], 1.0), abs=1e-3)
        assert (bg["named_right"] is None) == (bg["n_named"] == 0)
    assert {"background named right", "background noise within 2x real"} <= set(ev["bars"])
    div = ev["diversity"]
    assert (div["n_prompts"], div["n_single"], div["seeds"]) == (2, 1, 2) and div["real_images"]["diversity"] > 0
    assert all(div[v]["diversity"] >= 0 and 0 <= div[v]["fidelity"] <= 100 for v in ("unclip", "caption_only"))
    # captions a user would write: the first phrasings_per_kind (2) scenes of each kind, every held-out family
    ph = ev["phrasings"]
    assert ph["n_captions"] == 4 and set(ph) == {"n_captions", "test_split", "reordered", "rephrased"}
    assert ph["test_split"]["single"] == ev["ablation"]["unclip"]["single"]      # the same first scenes, images
    for family in ("reordered", "rephrased"):
        assert ph[family]["single"]["n"] == ph[family]["pair"]["n"] == 2 and ph[family]["example"]
    judge = json.loads(ws.metrics_path("judge").read_text())
    assert judge["n_test"] > 0 and set(judge["test_accuracy"]) >= {"color", "shape", "size", "position"}
    assert (ws.judge / "model.safetensors").exists()
    assert {p.name for p in (ws.reports / "evaluate").glob("*.png")} >= {
        "prompts_decoder.png", "prompts_upsample_1.png", "prompts_upsample_2.png", "test_real_vs_generated.png",
        "diversity.png"}


def test_reports_compare_and_dvc_metrics_diff_as_a_reviewer_sees_them(flow_runs, tmp_path, monkeypatch):
    """evaluate snapshots its run and builds a self-contained report (logged to MLflow); a second
    evaluation with one parameter changed is compared with the first, both pages open in headless
    Chromium with every image loaded and the figures of metrics/evaluate.json in their tables, and
    `dvc metrics diff` reports the change."""
    import subprocess
    import sys
    import mlflow
    import yaml
    from flows.train import stage_env
    from helpers.browser import open_page
    from pipeline import report
    from pipeline.tracking import flatten
    ws, first, _ = flow_runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (run_a,) = report.runs(ws)                              # the second flow run skipped evaluate
    snap = json.loads((run_a / "run.json").read_text())
    assert snap["identity"]["mlflow"]["parent_run_id"] == first["mlflow_parent_run_id"]
    assert snap["identity"]["dvc_lock"]["decoder"]["models/decoder"]                     # an md5
    assert set(snap["curves"]) >= {"clip", "prior", "decoder", "upsample@1", "upsample@2", "judge"}
    assert snap["metrics"]["evaluate"] == json.loads(ws.metrics_path("evaluate").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws.root / 'mlflow.db'}")
    run_id = snap["identity"]["mlflow"]["evaluate_run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/report.html"]

    # one parameter changed (the evaluation seed), only evaluate reruns, through DVC
    subprocess.run(["git", "add", "-A"], cwd=ws.root, check=True)
    subprocess.run(["git", "commit", "-qm", "first evaluation"], cwd=ws.root, check=True)
    params_before = ws.params.read_text()
    params = yaml.safe_load(params_before)
    params["evaluate"]["seed"] = 1
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=ws.root,
                              env=stage_env("smoke", None), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Running stage 'evaluate'" in proc.stdout and "Running stage 'decoder'" not in proc.stdout
        diff = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", "--json"], cwd=ws.root,
                              env=stage_env("smoke", None), capture_output=True, text=True, check=True)
        changed = json.loads(diff.stdout)["metrics/evaluate.json"]
        assert changed["seed"] == {"old": 0, "new": 1, "diff": 1}
    finally:
        ws.params.write_text(params_before)
    run_a2, run_b = report.runs(ws)
    assert run_a2 == run_a

    metrics = json.loads(ws.metrics_path("evaluate").read_text())
    seen = open_page(run_b / "report.html", tmp_path / "report.png")
    assert len(seen["images"]) >= 6 and all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    numeric = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in numeric.items():
        assert float(seen["cells"][f"evaluate.{key}"]) == pytest.approx(value, rel=1e-5), key
    assert metrics["standard"]["metric"] == "FD-CLIP"            # no Inception weights: declared, never silent
    assert "No Inception weights were given" in (run_b / "report.html").read_text()
    assert (tmp_path / "report.png").stat().st_size > 20_000

    page = report.compare(ws, "previous", "latest")
    seen = open_page(page, tmp_path / "compare.png")
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"])
    assert len(seen["images"]) == 2 * len(list((run_b / "images").glob("prompts_*.png"))) + 2
    rows = {r["key"]: r["cells"] for r in seen["rows"]}
    old = flatten(json.loads((run_a / "run.json").read_text())["metrics"]["evaluate"])
    for key, value in numeric.items():
        a_text, b_text = rows[f"evaluate.{key}"][1:3]
        assert float(b_text) == pytest.approx(value, rel=1e-5) and float(a_text) == pytest.approx(old[key], rel=1e-5)
    assert rows["evaluate.seed"][1:3] == ["0", "1"]
    assert "evaluate.seed" in page.read_text().split("config-diff", 1)[1].split("</table>", 1)[0]


def test_generate_from_the_command_line(flow_runs, tmp_path):
    import subprocess
    import sys
    from PIL import Image
    ws, _, _ = flow_runs
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--workspace", str(ws.root), "generate",
                           "a small red circle in the top left", "a blue square", "--n", "3", "--seed", "0",
                           "--steps", "3", "--out", str(out), "--stages"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 images at 32 px" in proc.stdout
    assert "unclip-pipeline@champion" in proc.stderr          # the registry's champion, unless told otherwise
    with Image.open(out) as im:
        assert im.width > 3 * 64 and im.height > 2 * 64           # 2 rows of 3 tiles, upscaled to 64 px
    assert out.with_suffix(".stage0.png").exists() and out.with_suffix(".stage1.png").exists()
    # no trained bundle: a clear error, exit 2
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "x", "--models", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_applications_of_the_latent_from_python_and_the_command_line(flow_runs, tmp_path):
    """vary / interpolate / textdiff / inpaint on a trained (smoke) bundle: shapes, seeds, the
    reconstruction, nothing changed outside an inpainting mask, files written, bad input exit 2."""
    import subprocess
    import sys
    from PIL import Image
    from pipeline import applications as apps
    from pipeline.applications.files import load_image
    from pipeline.data.embedding_shards import load_split
    from pipeline.generate import Unclip
    ws, _, _ = flow_runs
    unclip = Unclip.load(ws.root / "models")
    test = load_split(shard_paths(ws.embeddings), "test", image_size=unclip.sizes[-1])
    img = test["images"][:2]
    final = unclip.sizes[-1]
    v = apps.vary(unclip, img, seed=0, etas=(0.0, 1.0), n=2, steps=10)
    assert v["reconstruction"].shape == (2, 3, unclip.sizes[0], unclip.sizes[0]) and v["psnr"].shape == (2,)
    assert v["by_eta"][1.0].shape == v["fresh"].shape == (4, 3, final, final)
    v2 = apps.vary(unclip, img, seed=0, etas=(0.0, 1.0), n=2, steps=10)
    assert torch.equal(v["by_eta"][1.0], v2["by_eta"][1.0]) and torch.equal(v["reconstruction"], v2["reconstruction"])
    it = apps.interpolate(unclip, img[:1], img[1:], frames=3, steps=10)
    assert it["frames"].shape == (3, 3, final, final)
    assert torch.allclose(it["z_i"][0], v["z_i"][0], atol=1e-5) and torch.allclose(it["z_i"][-1], v["z_i"][1], atol=1e-5)
    td = apps.textdiff(unclip, img, ["a red circle"] * 2, ["a blue circle"] * 2, thetas=(0.0, 0.5), steps=10)
    assert set(td["by_theta"]) == {0.0, 0.5} and td["by_theta"][0.5].shape == (2, 3, final, final)
    # with the target caption as the decoder's text condition and guidance, the edit differs
    guided = apps.textdiff(unclip, img, ["a red circle"] * 2, ["a blue circle"] * 2, thetas=(0.5,), steps=10,
                           caption="after", guidance=3.0)
    assert not torch.equal(guided["by_theta"][0.5], td["by_theta"][0.5])
    swapped = apps.textdiff(unclip, img, ["a red circle"] * 2, ["a blue circle"] * 2, thetas=(0.0,), steps=10,
                            caption="before_after")
    assert swapped["by_theta"][0.0].shape == (2, 3, final, final)
    with pytest.raises(ValueError, match="caption"):
        apps.textdiff(unclip, img, ["a"] * 2, ["b"] * 2, caption="before")
    masks = torch.zeros(2, 1, final, final)
    masks[..., 4:20, 6:22] = 1
    ip = apps.inpaint(unclip, img, masks, ["a blue square"] * 2, seed=1, steps=10)
    keep = (masks == 0).expand_as(img)
    assert torch.equal(ip["images"][keep], img[keep]) and not torch.equal(ip["images"], img)

    Image.fromarray(img[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    Image.fromarray(img[1].permute(1, 2, 0).numpy()).save(tmp_path / "b.png")
    assert torch.equal(load_image(tmp_path / "a.png"), img[:1])
    cli = [sys.executable, "-m", "pipeline.cli", "--workspace", str(ws.root)]
    for args, out in ((["vary", "a.png", "--n", "2", "--steps", "5", "--out", "v.png"], "v.png"),
                      (["interpolate", "a.png", "b.png", "--frames", "3", "--steps", "5", "--out", "i.gif"], "i.gif"),
                      (["textdiff", "a.png", "--from", "a red circle", "--to", "a blue circle", "--thetas", "0,0.4",
                        "--caption", "after", "--guidance", "2", "--steps", "5", "--out", "t.png"], "t.png"),
                      (["inpaint", "a.png", "--caption", "a blue square", "--box", "0.2,0.2,0.6,0.6", "--n", "2",
                        "--steps", "5", "--out", "p.png"], "p.png")):
        proc = subprocess.run(cli + args, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert args[0] != "vary" or "reconstruction PSNR" in proc.stdout
        with Image.open(tmp_path / out) as im:
            assert im.width > 64
    with Image.open(tmp_path / "i.gif") as im:
        assert im.n_frames == 4                                     # there and back: 3 + 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for args, message in ((["vary", "bad.png"], "not a readable image"),
                          (["inpaint", "a.png", "--caption", "x", "--box", "0.6,0.2,0.4,0.9"], "need 0 <= x0 < x1"),
                          (["inpaint", "a.png", "--caption", "x"], "exactly one of --mask")):
        proc = subprocess.run(cli + args, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]


def test_generate_from_python_is_seeded(flow_runs):
    from pipeline.generate import Unclip
    ws, _, _ = flow_runs
    unclip = Unclip.load(ws.root / "models")
    a = unclip.generate(["a small red circle in the top left"], n=2, seed=3, steps=3)
    b = unclip.generate(["a small red circle in the top left"], n=2, seed=3, steps=3)
    assert a["images"].shape == (2, 3, 32, 32) and a["images"].dtype.is_floating_point is False
    assert torch.equal(a["images"], b["images"]) and not torch.equal(a["images"][0], a["images"][1])
    assert [s.shape[-1] for s in a["stages"]] == [8, 16, 32]
    assert a["nfe"]["decoder"] == 6                                # 3 steps x (conditional + unconditional)


def test_decoder_variant_bench_trains_and_judges_without_touching_the_workspace(flow_runs, tmp_path):
    import subprocess
    import sys
    ws, _, _ = flow_runs
    before = (ws.decoder / "model.safetensors").read_bytes()
    env = dict(os.environ, UNCLIP_PROFILE="smoke")
    cmd = [sys.executable, str(REPO / "bench" / "decoder_variant.py"), "--workspace", str(ws.root), "--name", "v",
           "--init-seed", "1", "--set", "steps=3", "--set", "checkpoint_every=2", "--set", "p_drop_caption=0.35", "--n", "2",
           "--samplers", "ddpm:2:2,dpm++:2:1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fig = json.loads((tmp_path / "v.json").read_text())
    assert fig["decoder"]["p_drop_caption"] == 0.35 and fig["train"]["steps"] == 3 and fig["init_seed"] == 1
    assert set(fig["samplers"]) == {"ddpm:2:2", "dpm++:2:1"}
    for f in fig["samplers"].values():
        assert 0 <= f["single"]["shape"] <= 100 and f["frechet_distance"] >= 0
    assert sum(fig["shape_readings"].values()) == fig["samplers"]["dpm++:2:1"]["single"]["n"]
    assert (tmp_path / "v.pt").exists() and (tmp_path / "v_ddpm2_g2.png").exists()
    assert (ws.decoder / "model.safetensors").read_bytes() == before
    # a warm restart from those weights, with one part of the initialisation drawn from seed 0 (then overwritten)
    cmd = cmd[:cmd.index("--name") + 1] + ["w", "--init-weights", str(tmp_path / "v.pt"), "--init-part", "layout=0"] + \
        cmd[cmd.index("--name") + 2:]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fig = json.loads((tmp_path / "w.json").read_text())
    assert fig["init_weights"] == str(tmp_path / "v.pt") and fig["init_parts"]["layout"]["seed"] == 0
    # a bad override fails with the section's own validation message, before any training
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "bad"), "--set", "steps=0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "decoder.steps" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_background_noise_bench_reads_every_stage_beside_real_images(flow_runs, tmp_path):
    import subprocess
    import sys
    ws, _, _ = flow_runs
    cmd = [sys.executable, str(REPO / "bench" / "background_noise.py"), "--workspace", str(ws.root), "--n", "2",
           "--batch-size", "4", "--rims", "0,1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fig = json.loads((tmp_path / "background_noise.json").read_text())
    sets = fig["sets"]
    stages = ["decoder"] + [f"upsample_{j}" for j in range(1, len(sets) - 1) if f"upsample_{j}" in sets]
    assert {"real test images", *stages} <= set(sets) and any(k.startswith("real, through") for k in sets)
    real = sets["real test images"]
    assert real["stray_percent"] == 0 and real["rims"]["0"] == real["rims"]["1"] == real["noise"]   # nothing stray
    for name, f in sets.items():
        assert f["rims"]["1"] == f["noise"] and f["rims"]["0"] >= f["noise"] - 1e-9, name   # leaving rims out only lowers it
        assert len(f["quantiles_50_75_90"]) == 3 and f["one_object"] >= 0 and f["two_objects"] >= 0, name
    assert (tmp_path / "stages.png").exists() and "upsample_" in done.stdout


def test_shape_readings_bench_counts_every_caption_at_every_stage(flow_runs, tmp_path):
    import subprocess
    import sys
    ws, _, _ = flow_runs
    cmd = [sys.executable, str(REPO / "bench" / "shape_readings.py"), "--workspace", str(ws.root), "--n", "3",
           "--batch-size", "4", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fig = json.loads((tmp_path / "shape_readings.json").read_text())
    assert fig["n"] == 3 and list(fig["stages"])[0] == "decoder" and "upsample_1" in fig["stages"]
    for name, f in fig["stages"].items():
        counts = f["readings"]
        assert sum(counts.values()) == 3, name
        right = sum(v for k, v in counts.items() if k.split(" -> ")[0].split(" ")[1] == k.split(" -> ")[1])
        assert abs(f["shape"] - 100 * right / 3) < 0.01, name


def test_binding_bench_tables_the_chain_without_touching_the_workspace(flow_runs, tmp_path):
    import hashlib
    import subprocess
    import sys
    ws, _, _ = flow_runs
    models = sorted(p for p in (ws.root / "models").rglob("*") if p.is_file())
    # content of every file; mtime too, except clip.model.load's open_clip registration (models/clip/.open_clip/),
    # which it rewrites with the same bytes on every load
    state = lambda: {p: (None if ".open_clip" in p.parts else p.stat().st_mtime_ns,  # noqa: E731
                         hashlib.sha256(p.read_bytes()).hexdigest()) for p in models}
    before = state()
    out = tmp_path / "binding.json"
    cmd = [sys.executable, str(REPO / "bench" / "binding.py"), "--workspace", str(ws.root), "--n", "3",
           "--batch-size", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fig = json.loads(out.read_text())
    table = fig["table"]
    assert fig["rows"] == ["real_images", "z_t", "z_i", "z_i_hat", "decoder_true_z_i", "decoder_z_i_hat",
                           "decoder_no_caption", "cascade"]
    assert set(table) == set(fig["rows"])                            # the JSON's keys are sorted; "rows" keeps the order
    assert fig["n_asked"] == 3 and fig["n"] == 3                     # the smoke test split holds at least 3 two-object scenes
    assert fig["n_candidates_per_scene"] == 3 + 2 * 6                # true, swapped, reversed, 12 colors replaced
    for name, row in table.items():
        assert row["n"] == fig["n"], name                            # every link on the same scenes
        assert row["reader"] == ("clip zero-shot" if name.startswith("z_") else "judge")
        for col in ("colors", "binding", "relation", "all"):
            assert 0 <= row[col]["value"] <= 100 and 0 <= row[col]["se"] <= 50, (name, col)
    assert table["z_i"]["cos_to_z_i"] is None and -1 <= table["z_i_hat"]["cos_to_z_i"]["value"] <= 1
    ex = fig["example_counterfactuals"]
    assert len(ex["color_replaced"]) == 12 and len({ex["true"], ex["colors_swapped"], ex["relation_reversed"]}) == 3
    assert "true z_i" in done.stdout and "cascade" in done.stdout    # the printed table
    # the same scenes phrased in a held-out family: the decoder and the cascade also on the canonical phrasing
    done = subprocess.run(cmd + ["--phrasing", "reordered"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    phrased = json.loads(out.read_text())
    assert phrased["rows"] == fig["rows"] + ["decoder_canonical_tokens", "cascade_canonical"]
    assert phrased["phrasing"] == "reordered" and phrased["example_counterfactuals"]["caption"] != ex["true"]
    assert phrased["table"]["z_i"] == table["z_i"]                   # the same scenes and their true z_i
    assert state() == before                                         # models read, never written
    assert not (ws.reports / "bench").exists()


def test_novel_captions_bench_judges_the_families_asked_at_the_sampling_asked(flow_runs, tmp_path):
    """bench/novel_captions.py with sampling overrides: the families asked, judged at that sampling, which the
    json records with its network evaluations per image (the prior's times its candidates)."""
    import subprocess
    import sys
    ws, _, _ = flow_runs
    out = tmp_path / "novel.json"
    cmd = [sys.executable, str(REPO / "bench" / "novel_captions.py"), "--workspace", str(ws.root), "--n-single", "2",
           "--n-pair", "2", "--batch-size", "4", "--out", str(out)]
    done = subprocess.run(cmd + ["--families", "test_split,reordered", "--n-candidates", "3", "--guidance", "3"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fig = json.loads(out.read_text())
    assert set(fig["families"]) == {"test_split", "reordered"} and fig["sampling"] == {"guidance": 3.0, "n_candidates": 3}
    saved = json.loads((ws.prior / "model.json").read_text())["info"]["sampling"]
    passes = saved["steps"] * (1 if saved["guidance_scale"] == 1 else 2)      # a guided step is two passes
    assert fig["nfe"]["prior"] == 3 * passes and fig["nfe"]["decoder"] > 0
    for family in fig["families"].values():
        assert 0 <= family["pair"]["relation"] <= 100 and family["clip_prefers"]["relation"] is not None
    assert "network evaluations per image" in done.stdout
    done = subprocess.run(cmd + ["--families", "reordered,paraphrased"], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "unknown ['paraphrased']" in done.stderr


def test_prior_comparison_trains_the_autoregressive_prior_beside_the_workspaces(flow_runs, tmp_path):
    """bench/prior_comparison.py: the autoregressive prior trained by the prior stage's recipe into
    models/<name>, then both priors through evaluate's comparison on the same captions; the
    workspace's own prior untouched."""
    import shutil
    import subprocess
    import sys
    ws, _, _ = flow_runs
    before = (ws.prior / "model.safetensors").read_bytes()
    out = tmp_path / "cmp.json"
    cmd = [sys.executable, str(REPO / "bench" / "prior_comparison.py"), "--workspace", str(ws.root), "--profile",
           "smoke", "--name", "prior_ar_test", "--set", "steps=3", "--n", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        assert done.returncode == 0, done.stderr[-2000:]
        fig = json.loads(out.read_text())
        cmp = fig["comparison"]
        assert list(cmp) == ["cascade", "prior_ar_test"] and fig["train"]["kind"] == "autoregressive"
        assert [cmp[k]["kind"] for k in cmp] == ["diffusion", "autoregressive"]
        codebook = fig["train"]["codebook"]
        assert codebook["train"]["components"] == 8 and 0 < codebook["train"]["explained_variance"] <= 1
        for f in cmp.values():
            assert -1 <= f["prior"]["cos_pred_image"] <= 1 and f["seconds_per_image"] > 0
            assert f["quality"]["single"]["n"] == 2 and f["quality"]["frechet_distance"] >= 0
            assert f["train_seconds"] > 0
        # 8 codes per candidate, twice for guidance (autoregressive.guidance_scale 2), 2 candidates (prior.n_candidates)
        assert cmp["prior_ar_test"]["nfe_prior"] == 32 and cmp["prior_ar_test"]["sampling"]["temperature"] == 0.5
        meta = json.loads((ws.root / "models" / "prior_ar_test" / "model.json").read_text())
        assert meta["kind"] == "prior" and meta["arch"]["kind"] == "autoregressive"
        assert "| prior_ar_test | autoregressive |" in done.stdout
        assert (ws.prior / "model.safetensors").read_bytes() == before
        assert not (ws.checkpoints / "prior_ar_test").exists() or not any((ws.checkpoints / "prior_ar_test").iterdir())
        # prior.kind: autoregressive as the cascade's own prior: a bundle with it as its prior loads and generates, seeded
        from pipeline.generate import Unclip
        models = tmp_path / "models"
        shutil.copytree(ws.root / "models", models, ignore=shutil.ignore_patterns("prior", "prior_ar_test", "judge"))
        shutil.copytree(ws.root / "models" / "prior_ar_test", models / "prior")
        unclip = Unclip.load(models)
        a, b = (unclip.generate(["a red circle"], n=2, seed=5) for _ in range(2))
        assert a["images"].shape[0] == 2 and torch.equal(a["images"], b["images"]) and a["nfe"]["prior"] == 32
        sweep = subprocess.run([sys.executable, str(REPO / "bench" / "prior_sampling_sweep.py"), "--workspace",
                                str(ws.root), "--prior", "models/prior_ar_test", "--guidance", "1,2",
                                "--temperature", "1,0.1"], capture_output=True, text=True, timeout=300)
        assert sweep.returncode == 0, sweep.stderr[-2000:]
        rows = [line for line in sweep.stdout.splitlines() if line.startswith("| 1.0 |") or line.startswith("| 2.0 |")]
        assert len(rows) == 2 and all(line.count(" / ") == 2 for line in rows)
    finally:
        shutil.rmtree(ws.root / "models" / "prior_ar_test", ignore_errors=True)
        shutil.rmtree(ws.checkpoints / "prior_ar_test", ignore_errors=True)


def test_new_pairs_crawl_filter_and_embed_alone_and_training_continues(flow_runs, monkeypatch):
    """10 % more corpus pairs: the next flow run crawls only their URLs, filters and embeds only
    the new shards, keeps CLIP and the judge, continues the diffusion models from their last
    weights, evaluates and gates; its summary says how each stage ran."""
    import math
    import pandas as pd
    import yaml
    from flows.train import train_flow
    from pipeline import config
    ws, _, _ = flow_runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.load(ws.params, "smoke")
    log_before = pd.read_parquet(ws.raw / "crawl_log.parquet")
    raw_before = {p.name: p.read_bytes() for p in shard_paths(ws.raw)}
    kept_before = {d: (d / "model.safetensors").read_bytes() for d in (ws.clip, ws.judge)}
    params = yaml.safe_load(ws.params.read_text())
    params["corpus"]["additions"] = [cfg.corpus.n_scenes // 10]
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        run = train_flow(workspace=str(ws.root), profile="smoke")
    finally:
        params["corpus"]["additions"] = []
        ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    rows = {r["stage"]: r for r in run["stages"]}
    assert all(r["status"] == "ran" for s, r in rows.items() if s != "promote"), run["stages"]
    assert rows["promote"]["status"] in ("promoted", "candidate")

    pairs = pd.read_parquet(ws.corpus / "pairs.parquet")
    new_urls = set(pairs.url) - set(log_before.url)
    assert len(new_urls) == len(pairs) - len(log_before) >= cfg.corpus.n_scenes // 10
    crawl = rows["crawl"]["figures"]
    assert crawl["attempted"] == crawl["incremental"]["new_urls"] == len(new_urls)   # only those
    log = pd.read_parquet(ws.raw / "crawl_log.parquet")
    assert set(log.url[log.part == 1]) == new_urls and len(log) == len(pairs)
    for name, data in raw_before.items():
        assert (ws.raw / name).read_bytes() == data                                 # untouched
    new_raw = [p for p in shard_paths(ws.raw) if p.name not in raw_before]
    assert new_raw and all(p.name.startswith("part001-") for p in new_raw)

    filt, embed = rows["filter"]["figures"], rows["embed"]["figures"]
    assert filt["shards_in"] == len(new_raw) and filt["input"] == crawl["succeeded"]
    assert embed["incremental"]["part"] == 1 and embed["input"] == filt["kept"]
    assert embed["totals"]["input"] == filt["totals"]["kept"]
    for d, data in kept_before.items():
        assert (d / "model.safetensors").read_bytes() == data
    assert rows["clip"]["figures"]["retrain"]["mode"] == rows["judge"]["figures"]["retrain"]["mode"] == "kept"
    for stage, tc in (("prior", cfg.prior), ("decoder", cfg.decoder),
                      ("upsample@1", cfg.upsample.stages["1"]), ("upsample@2", cfg.upsample.stages["2"])):
        f = rows[stage]["figures"]
        assert f["retrain"]["mode"] == "continued", (stage, f["retrain"])
        assert f["train"]["steps"] == math.ceil(tc.steps * cfg.retrain.finetune_fraction)
    from flows.train import how
    assert how("crawl", "ran", crawl) == f"part 1: {len(new_urls)} new URLs"
    assert how("prior", "ran", rows["prior"]["figures"]).startswith("continued")


def test_scheduled_deployment_runs_on_a_real_prefect_server(flow_runs, tmp_path):
    """`prefect server start` on a free loopback port, the deployment served by flows.deploy,
    a run triggered with `prefect deployment run` and executed to completion, and the cron
    schedule creating scheduled runs."""
    import re
    import subprocess
    import sys
    import urllib.request
    from flows.deploy import free_port, start_server
    ws, _, _ = flow_runs
    import base64
    import urllib.error
    auth = "unclip:test-" + os.urandom(8).hex()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # the server's scheduler service creates the schedule's runs every loop (default 60 s)
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
           # what `make serve` does with the workspace's generated one (flows/deploy.py)
           "PREFECT_API_AUTH_STRING": auth}
    env.pop("PREFECT_API_URL", None)
    server, api = start_server(free_port(), env=env)
    env["PREFECT_API_URL"] = api
    basic = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}

    def request(path, body=None, headers=None):
        req = urllib.request.Request(api + path, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read()), r.headers

    # H4: without the auth string, nothing but the health probe answers
    assert request("/health")[0] is True
    for path, body in (("/deployments/filter", {"limit": 1}), ("/flow_runs/filter", {"limit": 1}),
                       ("/admin/version", None)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            request(path, body)
        # a GET: 401 (no auth); a POST may meet the CSRF check first: 403; refused either way
        assert refused.value.code in ((401,) if body is None else (401, 403)), path
    with pytest.raises(urllib.error.HTTPError) as refused:
        request("/admin/version", None, {"Authorization": "Basic " + base64.b64encode(b"x:y").decode()})
    assert refused.value.code == 401
    # CSRF: a state-changing request with the auth string but no CSRF token is refused too
    with pytest.raises(urllib.error.HTTPError) as refused:
        request("/flow_runs/filter", {"limit": 1}, basic)
    assert refused.value.code == 403
    client_id = os.urandom(8).hex()
    token = request(f"/csrf-token?client={client_id}", headers=basic)[0]["token"]
    csrf = {**basic, "Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client_id}
    # CORS: a page from another origin gets no Access-Control-Allow-Origin for it
    _, headers = request("/admin/version", headers={**basic, "Origin": "http://evil.example"})
    assert headers.get("access-control-allow-origin") in (None, api.removesuffix("/api"))

    def get(path):
        return request(path, headers=basic)[0]

    def post(path, body):
        return request(path, body, csrf)[0]

    serving = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--name", "test-retrain", "--cron",
                                "*/5 * * * *", "--profile", "smoke", "--workspace", str(ws.root)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, dep = time.monotonic() + 120, None
        while dep is None and time.monotonic() < deadline:
            try:
                dep = get("/deployments/name/unclip-train/test-retrain")
            except OSError:
                assert serving.poll() is None, serving.stdout.read()[-3000:]
                time.sleep(2)
        assert dep is not None, "the deployment was not registered"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["*/5 * * * *"]
        assert dep["parameters"]["profile"] == "smoke"
        proc = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "unclip-train/test-retrain"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)
        deadline, state = time.monotonic() + 600, None
        while time.monotonic() < deadline:
            state = get(f"/flow_runs/{run_id}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(3)
        assert state == "COMPLETED", state
        deadline, scheduled = time.monotonic() + 90, []
        while not scheduled and time.monotonic() < deadline:
            scheduled = post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}},
                                                   "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                                                   "limit": 10, "offset": 0})
            time.sleep(0 if scheduled else 2)
        assert scheduled, "the cron schedule created no scheduled runs"
        assert all(r["deployment_id"] == dep["id"] for r in scheduled)
    finally:
        serving.terminate()
        server.terminate()
        serving.wait(timeout=60)
        server.wait(timeout=60)


def api_filter(path: str, body: dict):
    """POST a filter query to the Prefect API. (prefect 3.8.8's client sends explicit nulls for
    unset limit/sort/filters, which its own server rejects with 422, so we send the body.)"""
    import asyncio
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            response = await client._client.post(path, json=body)
            response.raise_for_status()
            return response.json()
    return asyncio.run(go())


def test_summary_artifact_published(flow_runs):
    arts = api_filter("/artifacts/filter", {"artifacts": {"key": {"any_": ["unclip-pipeline-summary"]}},
                                             "sort": "CREATED_DESC", "limit": 10, "offset": 0})
    assert arts, "no summary artifact"
    data = arts[0]["data"]
    table = data if isinstance(data, list) else json.loads(data)
    stages = {row["stage"] for row in table}           # the latest run: "promote" only when it evaluated
    assert set(STAGES) <= stages <= set(STAGES) | {"promote"}


def dvc_stale(ws) -> set[str]:
    """The stages `dvc status` calls stale (`config` is always changed: it writes the resolved config)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ws.root, check=True,
                         capture_output=True, text=True).stdout
    return set(json.loads(out)) - {"config"}


def test_a_changed_profile_or_parameter_reruns_exactly_what_dvc_calls_stale(flow_runs, monkeypatch):
    """DVC sees the resolved configuration (params.resolved.json), never a profile name: another
    profile that resolves to the same values reruns nothing; one that changes the evaluation's seed
    reruns evaluate alone; the flow forces nothing, and what ran is what `dvc status` said."""
    import copy
    import yaml
    from flows.train import train_flow
    from pipeline import config
    ws, _, _ = flow_runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = ws.params.read_text()
    params = yaml.safe_load(before)
    params["profiles"]["twin"] = copy.deepcopy(params["profiles"]["smoke"])       # same values, another name
    params["profiles"]["reseeded"] = copy.deepcopy(params["profiles"]["smoke"])
    params["profiles"]["reseeded"].setdefault("evaluate", {})["seed"] = 7
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # smoke first: whatever earlier tests left stale, and nothing else; then the other two
        for profile, expected in (("smoke", None), ("twin", set()), ("reseeded", {"evaluate"})):
            config.write_resolved(config.load(ws.params, profile), ws.root)
            stale = dvc_stale(ws)
            assert expected is None or stale == expected, (profile, stale)
            lock_before = yaml.safe_load((ws.root / "dvc.lock").read_text())["stages"]
            run = train_flow(workspace=str(ws.root), profile=profile)
            lock_after = yaml.safe_load((ws.root / "dvc.lock").read_text())["stages"]
            # what DVC redid: ran, or restored from its run cache (a stage DVC ran before with the
            # same inputs: "cached - skipping run", the flow's "skipped"); either way its lock entry moved
            redone = {s for s in lock_after if s != "config" and lock_after[s] != lock_before.get(s)}
            ran = {r["stage"] for r in run["stages"] if r["status"] == "ran"}
            assert redone == stale and ran <= stale, (profile, stale, redone, run["stages"])
            assert expected is None or ran == expected, (profile, run["stages"])
            assert dvc_stale(ws) == set()
        config.write_resolved(config.load(ws.params, "smoke"), ws.root)
        assert dvc_stale(ws) == {"evaluate"}              # back to smoke's seed: evaluate alone is stale
    finally:
        ws.params.write_text(before)


def test_nan_loss_fails_permanently_without_retries(flow_runs, monkeypatch):
    """prior.lr 1e30: the loss goes non-finite; `unclip stage` exits 2 and records it, the flow
    fails at once (one attempt, no retries) with the message, and the last prior stays."""
    import yaml
    from flows.train import StageFailed, train_flow
    ws, _, _ = flow_runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before, prior_before = ws.params.read_text(), (ws.prior / "model.safetensors").read_bytes()
    params = yaml.safe_load(before)
    params["profiles"]["smoke"]["prior"]["lr"] = 1e30
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        with pytest.raises(StageFailed) as err:
            train_flow(workspace=str(ws.root), profile="smoke", stages=["prior"])
    finally:
        ws.params.write_text(before)
    assert err.value.stage == "prior" and err.value.permanent, str(err.value)
    assert "NonFiniteLoss" in str(err.value) and "loss is" in str(err.value)
    last = api_filter("/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1, "offset": 0})[0]
    tasks = api_filter("/task_runs/filter", {"flow_runs": {"id": {"any_": [last["id"]]}},
                                              "sort": "EXPECTED_START_TIME_DESC", "limit": 50, "offset": 0})
    (prior,) = [t for t in tasks if t["name"] == "prior"]
    assert prior["state"]["type"] == "FAILED" and prior["run_count"] == 1      # not retried
    assert (ws.prior / "model.safetensors").read_bytes() == prior_before


def test_bad_input_fails_clearly_without_retries(flow_runs, monkeypatch):
    """A stage that exits 2 (bad input) fails the flow at once; completed stages stay intact."""
    import yaml
    from flows.train import StageFailed, train_flow
    ws, _, _ = flow_runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = yaml.safe_load(ws.params.read_text())
    params["crawl"]["url_list"] = "no-such-list.csv"
    ws.params.write_text(yaml.safe_dump(params))
    crawled_before = json.loads(ws.metrics_path("crawl").read_text())["totals"]["crawled"]   # all parts
    with pytest.raises(StageFailed) as err:
        train_flow(workspace=str(ws.root), profile="smoke")
    assert err.value.stage == "crawl" and err.value.permanent
    assert "no-such-list.csv" in str(err.value)
    last = api_filter("/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1, "offset": 0})[0]
    tasks = api_filter("/task_runs/filter", {"flow_runs": {"id": {"any_": [last["id"]]}},
                                              "sort": "EXPECTED_START_TIME_DESC", "limit": 50, "offset": 0})
    crawl = next(t for t in tasks if t["name"] == "crawl")
    assert crawl["state"]["type"] == "FAILED" and crawl["run_count"] == 1      # bad input is not retried
    # a URL list replaces the embedded corpus: the corpus stage ran before the crawl and was skipped
    # (the corpus stays in DVC's cache), the flow's summary says n/a
    from pipeline import truth
    assert "crawl.url_list is set" in truth.skipped(ws.corpus)
    assert json.loads(ws.metrics_path("corpus").read_text())["skipped"] == truth.skipped(ws.corpus)
    # data/raw is `persist: true` (the crawl builds on it) and replaced only atomically on
    # success: the failed crawl left it as it was, and dvc.lock still describes it.
    assert sum(count_samples(p) for p in shard_paths(ws.raw)) == crawled_before

"""bench/train_throughput.py at tiny sizes: every figure present and sane, the JSON written."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from helpers.bench import load_bench


def test_fixed_cost_is_the_least_squares_intercept():
    bench = load_bench("train_throughput")
    a, b = bench.fixed_cost({8: 0.05 + 8 * 0.01, 16: 0.05 + 16 * 0.01, 32: 0.05 + 32 * 0.01})
    assert abs(a - 0.05) < 1e-9 and abs(b - 0.01) < 1e-9
    assert bench.sweep_sizes(32, quick=False) == [8, 16, 32] and bench.sweep_sizes(2, quick=False) == [1, 2]


def test_quick_run_reports_every_figure(params_path, tmp_path):
    bench = load_bench("train_throughput")
    out = tmp_path / "bench" / "tt.json"
    report = bench.main(["--quick", "--profile", "smoke", "--params", str(params_path),
                         "--models", "clip+negatives,judge,prior,prior-sdpa,decoder,decoder+text-encoder,upsample@2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["models"]) == {"clip+negatives", "judge", "prior", "prior-sdpa", "decoder", "decoder+text-encoder",
                                     "upsample@2"}
    assert report["machine"]["peak_gflops"]["cpu fp32"]["median"] > 0
    for name, f in report["models"].items():
        assert f["batch"] == 2 and f["precision"] in ("bf16", "fp32"), name
        assert f["gflop_per_step"] > f["gflop_forward"] > 0, name        # backward costs FLOPs too
        assert f["s_per_step"] > 0 and f["mfu_pct"] > 0 and set(f["sweep_s_per_step"]) == {"1", "2"}, name
    prof = report["step_profile"]
    assert prof["model"] == "decoder" and set(prof["phases_ms"]) == set(bench.PHASES)
    assert prof["top_ops"] and all(o["self_cpu_ms"] >= 0 for o in prof["top_ops"])


def test_step_variants_time_every_variant(params_path):
    """bench/step_variants.py on the smoke profile: every model and variant timed, bad variants refused."""
    variants = load_bench("step_variants")
    threads = torch.get_num_threads()
    out = variants.main(["--profile", "smoke", "--params", str(params_path), "--models", "prior,upsample@2",
                         "--variants", "1:fp32,1:bf32", "--repeats", "1", "--steps", "1"])
    assert torch.get_num_threads() == threads                                # each variant puts the threads back
    assert set(out) == {"prior", "upsample@2"}
    assert all(set(v) == {"1:fp32", "1:bf32"} and min(v.values()) > 0 for v in out.values())
    assert torch.backends.mkldnn.fp32_precision == "none"                  # the bf32 variant is undone
    for bad in ("0:bf16", "two:bf16", "1:fp16"):
        with pytest.raises(argparse.ArgumentTypeError):
            variants.parse_variant(bad)


def test_thread_determinism_bench_finds_one_thread_count_repeatable(params_path, capsys):
    """bench/thread_determinism.py on the smoke profile: at one thread count the decoder's training is
    bit-identical run to run (what the bench's comparison across counts rests on)."""
    bench = load_bench("thread_determinism")
    threads = torch.get_num_threads()
    from pipeline import config
    d = config.load(params_path, "smoke").decoder
    try:
        first, again = bench.train(d, 1, 3, "fp32"), bench.train(d, 1, 3, "fp32")
        assert first[0] == again[0] and torch.equal(first[1], again[1])
        assert bench.compare(first, again).startswith("every loss identical")
        bench.main(["--steps", "2", "--threads", "1", "--params", str(params_path), "--profile", "smoke"])
        assert "1 thread(s) twice: every loss identical" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)             # train() sets the count it measures


@pytest.mark.parametrize("a,b", [("clip-full-table", "clip"), ("judge-nchw", "judge")])
def test_paired_steps_times_both_models_in_turn(params_path, a, b):
    """bench/paired_steps.py on the smoke profile: both models step in every pair, the ratio is B over A."""
    paired = load_bench("paired_steps")
    out = paired.main([a, b, "--profile", "smoke", "--params", str(params_path), "--pairs", "3", "--warmup", "1"])
    assert (out["a"], out["b"], out["pairs"]) == (a, b, 3)
    assert out["a_s"] > 0 and out["b_s"] > 0 and out["quartiles"][0] <= out["b_over_a"] <= out["quartiles"][1]


def test_steady_steps_times_each_batch_size_and_fits_the_fixed_cost(params_path):
    """bench/steady_steps.py on the smoke profile: every batch size timed in every round, the fixed cost the
    intercept of its medians (train_throughput's fit), its share against the largest batch's step."""
    steady = load_bench("steady_steps")
    out = steady.main(["prior", "--profile", "smoke", "--params", str(params_path), "--batches", "2,4",
                       "--blocks", "2", "--steps", "1", "--warmup", "1", "--rounds", "2"])
    assert set(out["s_per_step"]) == {2, 4} and all(s > 0 for s in out["s_per_step"].values())
    a, b = load_bench("train_throughput").fixed_cost(out["s_per_step"])
    assert (out["fixed_s"], out["per_sample_s"]) == (a, b)
    assert out["fixed_share"] == a / out["s_per_step"][4]

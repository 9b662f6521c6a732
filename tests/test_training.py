"""The shared training loop: checkpoints, resume to the same step count, non-finite guard."""
import pytest
import torch

from pipeline.training import Checkpointer, NonFiniteLoss, clip_gradients, cosine_with_warmup, ema_model, fit


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, cosine_with_warmup(opt, 2, 10)


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, x.sum(-1, keepdim=True)


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


class Killed(Exception):
    pass


def test_killed_run_resumes_and_ends_at_the_same_step(tmp_path):
    model, opt, sched = setup()
    ckpt = Checkpointer(tmp_path, "k", every=3)

    def die_at_7(step):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        fit(model, opt, sched, batches(), mse, steps=10, checkpointer=ckpt, after_step=die_at_7)
    assert ckpt.path.exists()
    model2, opt2, sched2 = setup(seed=1)                    # a fresh process: other init
    summary = fit(model2, opt2, sched2, batches(), mse, steps=10, checkpointer=ckpt)
    assert summary["resumed_from"] == 6 and summary["steps"] == 10
    assert sched2.last_epoch == 10                           # the lr schedule resumed too


def test_a_resumed_run_tells_after_step_where_it_starts(tmp_path):
    """What follows the step count (CLIP's hard negatives from a given step) sees a resumed run's
    steps before its first batch, not 0."""
    ckpt = Checkpointer(tmp_path, "k", every=3)
    model, opt, sched = setup()
    fit(model, opt, sched, batches(), mse, steps=6, checkpointer=ckpt)
    seen = []
    model2, opt2, sched2 = setup()
    fit(model2, opt2, sched2, batches(), mse, steps=8, checkpointer=ckpt, after_step=seen.append)
    assert seen == [6, 7, 8]


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    model, opt, sched = setup()
    Checkpointer(tmp_path, "old", every=1).save(5, model, opt, sched)
    summary = fit(model, opt, sched, batches(), mse, steps=3, checkpointer=Checkpointer(tmp_path, "new", every=1))
    assert summary["resumed_from"] == 0


def test_non_finite_loss_stops_the_run(tmp_path):
    model, opt, sched = setup()

    def nan_loss(model, batch):
        return mse(model, batch) * float("nan")

    with pytest.raises(NonFiniteLoss, match="loss is nan at step 0"):
        fit(model, opt, sched, batches(), nan_loss, steps=3)


def test_skip_mode_drops_non_finite_steps_and_counts_them():
    model, opt, sched = setup()
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss = mse(model, batch)
        return loss * float("nan") if calls["n"] in (2, 4) else loss

    before = model.weight.detach().clone()
    summary = fit(model, opt, sched, batches(), sometimes_nan, steps=6, on_nonfinite="skip")
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert torch.isfinite(model.weight).all() and not torch.equal(before, model.weight)
    with pytest.raises(NonFiniteLoss, match="already skipped"):
        fit(*setup(), batches(), lambda m, b: mse(m, b) * float("nan"), steps=6, on_nonfinite="skip",
            max_skipped=2)


def test_ema_tracks_the_weights_and_resumes_with_them(tmp_path):
    from diffusers.training_utils import EMAModel
    model, opt, sched = setup()
    ema = EMAModel(model.parameters(), decay=0.5)
    ckpt = Checkpointer(tmp_path, "ema", every=2)

    def die_at_3(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        fit(model, opt, sched, batches(), mse, steps=6, checkpointer=ckpt, ema=ema, after_step=die_at_3)
    saved = torch.load(ckpt.path, weights_only=False)["extra"]["ema"]
    model2, opt2, sched2 = setup(seed=3)
    ema2 = EMAModel(model2.parameters(), decay=0.5)
    fit(model2, opt2, sched2, batches(), mse, steps=6, checkpointer=ckpt, ema=ema2)
    assert ema2.optimization_step == 6 and saved["optimization_step"] == 2
    shadow = [p.clone() for p in ema2.shadow_params]
    assert not torch.equal(shadow[0], model2.weight.detach())      # an average, not a copy
    ema2.copy_to(model2.parameters())
    assert torch.equal(model2.weight.detach(), shadow[0])


@pytest.mark.parametrize("grad_clip, clipped", [(1e-4, 5), (1e4, 0), (None, 0)])
def test_the_summary_counts_the_clipped_steps(grad_clip, clipped):
    summary = fit(*setup(), batches(), mse, steps=5, grad_clip=grad_clip)
    assert summary["clipped_steps"] == clipped


def _net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    net[1].weight.requires_grad_(False)                      # one frozen tensor: copied, not averaged
    return net


def test_ema_lerp_update_equals_diffusers_update():
    # training.ema_model's one foreach lerp against diffusers' own foreach update, over steps whose
    # decay runs through diffusers' warmup (0 at the first step, then (1 + s) / (10 + s), capped)
    from diffusers.training_utils import EMAModel
    net = _net()
    ours, theirs = ema_model(net.parameters(), decay=0.9), EMAModel(net.parameters(), decay=0.9, foreach=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ours.step(net.parameters())
        theirs.step(net.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
        for a, b in zip(ours.shadow_params, theirs.shadow_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours.shadow_params[2] is not net[1].weight and torch.equal(ours.shadow_params[2], net[1].weight)
    assert not torch.equal(ours.shadow_params[0], net[0].weight)        # an average, not a copy
    restored = ema_model(_net(seed=5).parameters(), decay=0.9)
    restored.load_state_dict(ours.state_dict())
    assert restored.optimization_step == 12
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow_params, ours.shadow_params))


@pytest.mark.parametrize("max_norm", [1e3, 0.5])                  # nothing clipped / every gradient scaled
def test_clip_gradients_is_torchs_clipping_bit_for_bit(max_norm):
    grads = {}
    for how in ("torch", "ours"):
        net = _net()
        net(torch.randn(5, 6, generator=torch.Generator().manual_seed(2))).square().sum().backward()
        params = [p for p in net.parameters() if p.requires_grad]
        norm = (torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True) if how == "torch"
                else clip_gradients(params, max_norm))
        grads[how] = (norm, [p.grad.clone() for p in params])
    assert torch.equal(grads["torch"][0], grads["ours"][0])
    assert all(torch.equal(a, b) for a, b in zip(grads["torch"][1], grads["ours"][1]))
    assert (grads["ours"][0] > max_norm) == (max_norm == 0.5)        # the two cases are the two cases


def test_two_cpu_processes_train_one_model(tmp_path):
    # torchrun (as `accelerate launch` does) starts two CPU processes; the loop runs unchanged
    # under DDP: gradients averaged, so both processes end with identical weights.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "tests" / "helpers" / "ddp_fit.py"), str(tmp_path), "12"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["summary"]["processes"] == 2
    assert r0["weight"] == r1["weight"]
    assert r0["summary"]["steps"] == 12 and (tmp_path / "ckpt" / "ddp.pt").exists()
    # a second launch resumes from the last checkpoint, written after the last step (kept until
    # a stage has committed its output), and ends at the same count without training again
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert r0["summary"]["resumed_from"] == 12 and r0["summary"]["steps"] == 12


def test_auto_precision_is_bf16_only_where_the_cpu_has_it_natively():
    """oneDNN reports bf16 on any AVX512 CPU; emulated, it is 2.2x slower than fp32 there."""
    import platform
    from pathlib import Path
    from pipeline.device import native_cpu_bf16, use_bf16
    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    assert use_bf16("auto", cpu) == native_cpu_bf16()
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("the CPU flags are read from Linux's /proc/cpuinfo on x86")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert native_cpu_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def noisy_mse(model, batch):
    """A loss that draws from the global RNG (as the diffusion losses draw t and noise)."""
    x, y = batch
    from pipeline.device import autocast
    with autocast("auto", x.device):
        out = model(x + 0.01 * torch.randn(x.shape))
    return torch.nn.functional.mse_loss(out.float(), y)


def test_auto_precision_is_measured_cached_and_leaves_the_run_unchanged(tmp_path, monkeypatch):
    import pipeline.training as training
    monkeypatch.setattr(training, "native_cpu_bf16", lambda: True)     # as on an AVX512-BF16 machine
    cache = tmp_path / "precision.json"
    runs = []
    for _ in range(2):                                   # measured, then from the cache
        model, opt, sched = setup()
        summary = fit(model, opt, sched, batches(), noisy_mse, steps=5, precision="auto", precision_cache=cache)
        runs.append((summary, model.weight.detach().clone()))
    (first, w1), (second, w2) = runs
    assert first["precision"]["choice"] in ("bf16", "fp32") and first["precision"]["cached"] is False
    assert first["precision"]["bf16_s"] > 0 and first["precision"]["fp32_s"] > 0
    assert second["precision"] == first["precision"] | {"cached": True}
    assert torch.equal(w1, w2)          # the timing consumed no randomness of the run
    # a setting in params.yaml is taken as it is; no native bf16: fp32 without timing anything
    model, opt, sched = setup()
    assert fit(model, opt, sched, batches(), mse, steps=1, precision="fp32")["precision"]["choice"] == "fp32"
    monkeypatch.setattr(training, "native_cpu_bf16", lambda: False)
    got = training.choose_precision("auto", model, mse, next(batches()), key="k", cache=tmp_path / "other.json")
    assert got["choice"] == "fp32" and "no native bf16" in got["why"] and not (tmp_path / "other.json").exists()


def test_auto_precision_decides_autocast_inside_the_loop_only():
    from pipeline.device import resolved_precision, use_bf16
    cpu = torch.device("cpu")
    with resolved_precision("fp32"):
        assert not use_bf16("auto", cpu) and use_bf16("bf16", cpu)
    with resolved_precision("bf16"):
        assert use_bf16("auto", cpu) and not use_bf16("fp32", cpu)

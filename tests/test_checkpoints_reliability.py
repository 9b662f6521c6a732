"""Training checkpoints and stage outputs under faults (SECURITY.md, reliability review M1, M2,
M3, M6, M10): a kill during validation keeps the training (M1); a checkpoint loads without
unpickling code, and one that does not load is set aside instead of blocking its stage for ever
(M2); a checkpoint is resumed only on the data and the CLIP it was trained with (M3); no train
samples is a clear error, not an endless wait (M6); what a killed stage leaves is swept up, and
what is renamed into place was on disk first (M10)."""
from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import config, training
from pipeline.data.shards import ShardSink
from pipeline.stages import StageError, run_stage
from pipeline.training import Checkpointer, cosine_with_warmup, fit
from pipeline.workspace import Workspace, atomic_dir

REPO = Path(__file__).resolve().parent.parent
DEAD_PID = 2 ** 22 + 12345            # above Linux's pid_max (2^22): never a live process


def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, cosine_with_warmup(opt, 2, 10)


def batches():
    g = torch.Generator().manual_seed(1)
    while True:
        x = torch.randn(8, 3, generator=g)
        yield x, x.sum(1, keepdim=True)


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


# ---- M2: what a checkpoint may hold, and one that does not load -----------------------------------------
class Payload:
    """Unpickled, it writes a marker file: what arbitrary code in a checkpoint could do."""
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_checkpoint_with_pickled_code_is_refused_and_set_aside(tmp_path):
    marker = tmp_path / "marker"
    model, opt, sched = setup()
    ckpt = Checkpointer(tmp_path / "ckpt", "k", every=1)
    ckpt.save(3, model, opt, sched, {"hook": Payload(str(marker))})
    summary = fit(model, opt, sched, batches(), mse, steps=4, checkpointer=ckpt)
    assert not marker.exists()
    assert summary["resumed_from"] == 0
    assert [p.name.split(".corrupt-")[0] for p in (tmp_path / "ckpt").glob("*.corrupt-*")] == ["k.pt"]


def test_inception_weights_with_pickled_code_are_refused(tmp_path):
    from pipeline.quality import InceptionFeatures
    marker, weights = tmp_path / "marker", tmp_path / "pt_inception.pth"
    torch.save({"conv.weight": torch.zeros(1), "hook": Payload(str(marker))}, weights)
    with pytest.raises(StageError, match="does not load as plain weights"):
        InceptionFeatures(str(weights))
    assert not marker.exists()


def test_truncated_checkpoint_is_set_aside_and_training_starts_over(tmp_path, capsys):
    model, opt, sched = setup()
    ckpt = Checkpointer(tmp_path, "k", every=2)
    fit(model, opt, sched, batches(), mse, steps=4, checkpointer=ckpt)
    data = ckpt.path.read_bytes()
    ckpt.path.write_bytes(data[: len(data) // 2])                   # a power loss, a full disk
    model, opt, sched = setup()
    summary = fit(model, opt, sched, batches(), mse, steps=6, checkpointer=ckpt)
    assert summary["resumed_from"] == 0 and summary["steps"] == 6
    assert "does not load" in capsys.readouterr().out
    assert len(list(tmp_path.glob("k.pt.corrupt-*"))) == 1
    # and the next run of the same key resumes from the fresh checkpoint (6), as ever
    model, opt, sched = setup()
    assert fit(model, opt, sched, batches(), mse, steps=6, checkpointer=ckpt)["resumed_from"] == 6


def test_checkpoint_save_is_synced_and_leaves_nothing_on_a_full_disk(tmp_path, monkeypatch):
    model, opt, sched = setup()
    ckpt = Checkpointer(tmp_path, "k", every=1)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    ckpt.save(1, model, opt, sched)
    assert len(synced) >= 2                           # the file, then the directory holding its new name

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        ckpt.save(2, model, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pt"]
    # a dead process's temporary file is removed by the next load
    (tmp_path / f"k.tmp{DEAD_PID}").write_bytes(b"partial")
    (tmp_path / f"k.tmp{os.getpid()}").write_bytes(b"ours, in flight")
    monkeypatch.undo()
    ckpt.load(*setup())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pt", f"k.tmp{os.getpid()}"]


# ---- M1 and M3: through the prior stage -------------------------------------------------------------------
STEPS = 6


@pytest.fixture
def prior_ws(data_ws, smoke_cfg, tmp_path):
    """A workspace with its own copy of the smoke embeddings and CLIP (so they can be changed)."""
    if not (data_ws.embeddings.exists() and data_ws.clip.exists()):
        run_stage("clip", smoke_cfg, data_ws)
        run_stage("embed", smoke_cfg, data_ws)
    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(data_ws.embeddings, ws.embeddings)
    shutil.copytree(data_ws.clip, ws.clip)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["smoke"]["prior"].update(steps=STEPS, checkpoint_every=2)
    ws.params.write_text(yaml.safe_dump(params))
    return ws, config.load(ws.params, "smoke")


def checkpoints(ws) -> list[Path]:
    return sorted((ws.checkpoints / "prior").glob("*.pt"))


def test_kill_during_validation_keeps_the_training(prior_ws, monkeypatch):
    ws, cfg = prior_ws
    from pipeline.prior import stage as prior_stage

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during validation")
    with monkeypatch.context() as mp:
        mp.setattr(prior_stage, "evaluate", killed)
        with pytest.raises(KeyboardInterrupt):
            run_stage("prior", cfg, ws)
    assert not ws.prior.exists() and len(checkpoints(ws)) == 1
    figures = run_stage("prior", cfg, ws)
    assert figures["train"]["resumed_from"] == STEPS and figures["train"]["steps"] == STEPS
    assert (ws.prior / "model.safetensors").exists() and checkpoints(ws) == []    # cleared once saved


def kill_after_step(monkeypatch, at: int):
    """Checkpointer.save, then a kill once step ``at`` is on disk."""
    real = Checkpointer.save

    def save(self, step, *args, **kwargs):
        real(self, step, *args, **kwargs)
        if step == at:
            raise KeyboardInterrupt(f"killed after the checkpoint of step {at}")
    monkeypatch.setattr(Checkpointer, "save", save)


@pytest.mark.parametrize("change", ["data", "clip"])
def test_checkpoint_is_not_resumed_after_data_or_clip_change(prior_ws, monkeypatch, change):
    ws, cfg = prior_ws
    with monkeypatch.context() as mp:
        kill_after_step(mp, 4)
        with pytest.raises(KeyboardInterrupt):
            run_stage("prior", cfg, ws)
    assert len(checkpoints(ws)) == 1
    if change == "data":                  # new embeddings beside the old: other training data
        first = sorted(ws.embeddings.glob("*.tar"))[0]
        shutil.copyfile(first, ws.embeddings / f"part001-{first.name}")
    else:                                 # another CLIP: another embedding space
        from safetensors.torch import load_file, save_file
        weights = load_file(str(ws.clip / "model.safetensors"))
        name = next(k for k, v in weights.items() if v.is_floating_point())
        weights[name] = weights[name] + 0.01
        save_file(weights, str(ws.clip / "model.safetensors"))
    figures = run_stage("prior", cfg, ws)
    assert figures["train"]["resumed_from"] == 0


def test_same_data_and_clip_still_resume(prior_ws, monkeypatch):
    ws, cfg = prior_ws
    with monkeypatch.context() as mp:
        kill_after_step(mp, 4)
        with pytest.raises(KeyboardInterrupt):
            run_stage("prior", cfg, ws)
    assert run_stage("prior", cfg, ws)["train"]["resumed_from"] == 4


# ---- M6: no train samples ---------------------------------------------------------------------------------
def val_only_shards(directory: Path, n: int = 6) -> list[Path]:
    import io
    import json
    from PIL import Image
    with ShardSink(directory, 3) as sink:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(buf, format="JPEG")
            sink.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "txt": "a red disc",
                        "json": json.dumps({"key": f"k{i}", "split": "val" if i % 2 else "test"})})
    return sorted(directory.glob("*.tar"))


def within(seconds: float, fn):
    """fn()'s exception (None if it returned); fails if it is still running after ``seconds``
    (it is left behind in a daemon thread)."""
    out = {}

    def target():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            out["err"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it hangs"
    return out.get("err")


def test_clip_training_without_train_samples_is_a_stage_error(tmp_path):
    from pipeline.clip.data import train_batches
    paths = val_only_shards(tmp_path / "filtered")
    tokenize = lambda captions: torch.zeros(len(captions), 8, dtype=torch.long)     # noqa: E731
    err = within(60, lambda: next(iter(train_batches(paths, tokenize, 2, 0, 32))))
    assert isinstance(err, StageError) and "no train samples" in str(err) and "(3 test, 3 val)" in str(err)


def test_upsampler_training_without_train_samples_is_a_stage_error(tmp_path, smoke_cfg):
    from pipeline.upsampler import stage as upsampler_stage
    paths = val_only_shards(tmp_path / "filtered")
    key, u = next(iter(smoke_cfg.upsample.stages.items()))
    u = u.model_copy(update={"condition": "none"}) if upsampler_stage.conditioned(u) else u
    in_size, out_size = upsampler_stage.chain_sizes(smoke_cfg)[key]
    err = within(60, lambda: upsampler_stage.train(u, key, paths, in_size, out_size, tmp_path / "ckpt"))
    assert isinstance(err, StageError) and "no train samples" in str(err)


# ---- M10: what killed stages leave behind, and durable renames -----------------------------------------
def test_stale_temp_dirs_are_swept_and_old_output_restored(tmp_path):
    final = tmp_path / "data" / "raw"
    final.parent.mkdir()
    # a stage killed between its two renames: the previous output is hidden, the final name missing
    old = final.parent / f".raw.old-{DEAD_PID}-1"
    old.mkdir()
    (old / "00000.tar").write_bytes(b"previous output")
    # a dead process's temp dir, one named before names carried the pid, a second moved-aside output
    for name in (f".raw.tmp-{DEAD_PID}-abc", ".raw.tmp-q1w2e3r4", f".raw.old-{DEAD_PID}-2"):
        (final.parent / name).mkdir()
        (final.parent / name / "junk").write_bytes(b"x" * 1000)
    live = final.parent / f".raw.tmp-{os.getpid()}-inflight"           # a live process's: left alone
    live.mkdir()
    other = final.parent / f".filtered.tmp-{DEAD_PID}-x"               # another output's: not this call's
    other.mkdir()
    with atomic_dir(final) as out:
        assert (final / "00000.tar").read_bytes() == b"previous output"   # restored before the stage runs
        (out / "00000.tar").write_bytes(b"new output")
    assert (final / "00000.tar").read_bytes() == b"new output"
    assert sorted(p.name for p in final.parent.iterdir()) == sorted(["raw", live.name, other.name])


def test_atomic_dir_syncs_files_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    with atomic_dir(tmp_path / "out") as out:
        (out / "sub").mkdir()
        (out / "a.tar").write_bytes(b"a")
        (out / "sub" / "b.json").write_bytes(b"{}")
        synced.clear()
    names = [Path(p).name for p in synced]
    assert "a.tar" in names and "b.json" in names
    assert str(tmp_path) in synced                    # the rename itself


def test_workspace_gitignore_covers_temp_dirs(tmp_path):
    import subprocess
    from pipeline import workspace
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(workspace.GITIGNORE)
    paths = ["data/.raw.tmp-123-abcd/00000.tar", f"models/.prior.old-{DEAD_PID}-5/model.json", "data/raw/00000.tar"]
    out = subprocess.run(["git", "check-ignore", *paths], cwd=tmp_path, capture_output=True, text=True).stdout
    assert out.split() == paths[:2]

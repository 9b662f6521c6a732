"""The kill campaign: every training stage (clip, prior, decoder, upsample@1, judge; smoke profile)
and the crawl SIGKILLed again and again at seeded random moments, then rerun.

Training stages are killed at random optimizer steps and at the moments where a crash costs the
most: while a checkpoint is being written, during validation (training done), while the output
is being saved (written into its temp dir), and between the two renames that put it in place
(``$UNCLIP_KILL_AT``, :func:`pipeline.workspace.kill_point`). The crawl is killed at seeded
random delays (its whole process group: img2dataset's workers too), and during saving.
Each kill lands on the run that resumed after the previous one. After every kill the final
output is absent or exactly the previous complete version; after the rerun the stage ends at
the step count of an uninterrupted run with the same files and tensor shapes, and nothing is
left behind in the workspace (no temp dirs, moved-aside outputs, checkpoints or their temp files).

The stages run in forked children of one forkserver that has imported them once, so a run costs
what the stage costs, not an interpreter start; the figures are printed at the end.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from pipeline.workspace import Workspace

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SEED = 19
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-|\.tmp\d+$|\.corrupt-")
TRAINING = ("clip", "prior", "decoder", "upsample@1", "judge")


@pytest.fixture(scope="module")
def forkserver():
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import kill_child
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(kill_child.PRELOAD + ["helpers.kill_child"])
    return ctx


class Runner:
    def __init__(self, ctx, cfg, tmp: Path):
        self.ctx, self.cfg, self.tmp, self.n = ctx, cfg, tmp, 0

    def start(self, stage: str, ws: Workspace, kill_at: str | None = None):
        from helpers.kill_child import run_stage_child
        self.n += 1
        result, log = self.tmp / f"run{self.n}.json", self.tmp / f"run{self.n}.log"
        proc = self.ctx.Process(target=run_stage_child, args=(stage, self.cfg, ws, kill_at, str(result), str(log)))
        proc.start()
        return proc, result, log

    def finish(self, proc, kill_after: float | None = None) -> int:
        if kill_after is not None:
            proc.join(kill_after)
            if proc.exitcode is None:
                _killpg(proc.pid)
        proc.join()
        _killpg(proc.pid)                           # whatever of its group outlived it
        return proc.exitcode

    def run(self, stage: str, ws: Workspace, kill_at: str | None = None) -> tuple[int, dict]:
        proc, result, log = self.start(stage, ws, kill_at)
        code = self.finish(proc)
        if code not in (0, -signal.SIGKILL):
            pytest.fail(f"{stage} (kill_at={kill_at}) exited {code}:\n{log.read_text()[-3000:]}")
        return code, (json.loads(result.read_text()) if code == 0 else {})


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def digest(d: Path) -> dict | None:
    if not d.exists():
        return None
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def shapes(d: Path) -> dict:
    from safetensors import safe_open
    out = {}
    for p in sorted(d.rglob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out[str(p.relative_to(d))] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return out


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def leftovers(root: Path, before: dict[str, int], outputs: list[Path]) -> dict[str, int]:
    """Files of ``root`` that a killed run left: temp/old/corrupt names anywhere, checkpoints,
    and any file that was not there after the uninterrupted run (outside the outputs)."""
    now = files(root)
    outs = [str(o.relative_to(root)) + os.sep for o in outputs]
    left = {}
    for rel, size in now.items():
        parts = Path(rel).parts
        named = any(LEFTOVER.search(p) for p in parts)
        ckpt = parts[:2] == (".unclip", "checkpoints") and (rel.endswith(".pt") or ".tmp" in rel)
        new = rel not in before and not any(rel.startswith(o) for o in outs)
        if named or ckpt or new:
            left[rel] = size
    for p in root.rglob("*"):                     # empty temp dirs count too (as 0 bytes)
        if p.is_dir() and LEFTOVER.search(p.name):
            left.setdefault(str(p.relative_to(root)) + "/", 0)
    return left


def output_of(ws: Workspace, stage: str) -> Path:
    return {"clip": ws.clip, "prior": ws.prior, "decoder": ws.decoder, "upsample@1": ws.upsampler("1"),
            "judge": ws.judge, "crawl": ws.raw}[stage]


def steps_of(figures: dict):
    return (figures.get("train") or {}).get("steps")


def copy_data(src: Workspace, dst: Path, parts: list[str]) -> Workspace:
    ws = Workspace.at(dst)
    (ws.root / "data").mkdir(parents=True)
    shutil.copyfile(src.params, ws.params)
    for part in parts:
        shutil.copytree(src.root / "data" / part, ws.root / "data" / part, symlinks=True)
    return ws


def training_campaign(runner: Runner, ws: Workspace, stage: str, cfg, rng: random.Random) -> dict:
    out = output_of(ws, stage)
    code, ref = runner.run(stage, ws)                          # uninterrupted: the reference
    assert code == 0
    v1, ref_shapes, ref_steps = digest(out), shapes(out), steps_of(ref)
    assert v1 and ref_shapes and ref_steps
    before = files(ws.root)
    total = ref_steps
    # two at random moments of training (after a random step, or while a random checkpoint is
    # written), then the three after training: validation, saving, between the renames
    plan = [f"step:{n}" for n in sorted(rng.randint(1, total - 1) for _ in range(2))]
    if rng.random() < 0.5:
        plan[1] = "checkpoint"
    plan += ["validation", "saving", "renaming"]
    kills, absent = 0, 0
    for kill_at in plan:
        code, _ = runner.run(stage, ws, kill_at)
        assert code == -signal.SIGKILL, f"{stage}: the run meant to die at {kill_at} ended with {code}"
        kills += 1
        now = digest(out)
        assert now is None or now == v1, f"{stage}: after a kill at {kill_at} {out.name}/ is neither absent nor " \
                                         f"the previous complete version"
        absent += now is None
    code, fig = runner.run(stage, ws)                          # the rerun
    assert code == 0
    assert steps_of(fig) == ref_steps, (stage, steps_of(fig), ref_steps)
    assert (fig.get("train") or {}).get("resumed_from") == ref_steps       # the last kills lost no training
    assert set(digest(out)) == set(v1) and shapes(out) == ref_shapes
    left = leftovers(ws.root, before, [out])
    assert not left, f"{stage}: left behind {left}"
    return {"kills": kills, "kill_points": plan, "reruns": len(plan), "output_absent_after_kill": absent,
            "steps": ref_steps, "bytes_left_behind": sum(left.values())}


def crawl_campaign(runner: Runner, data_ws: Workspace, root: Path, rng: random.Random) -> dict:
    """The crawl from nothing (its data/raw is created by the run that finishes), killed at
    seeded random delays within the time an uninterrupted crawl took, and once while saving."""
    ws = copy_data(data_ws, root, ["corpus"])
    before = files(ws.root)
    took = json.loads(data_ws.metrics_path("crawl").read_text())["duration_s"]
    kills, plan, tries = 0, [], 0
    while kills < 5 and tries < 12:
        tries += 1
        delay = round(rng.uniform(0.05, 0.6) * took, 2)
        t = time.monotonic()
        proc, _, log = runner.start("crawl", ws)
        code = runner.finish(proc, kill_after=delay)
        if code == 0:            # finished before the kill (a faster machine than the estimate): from nothing again
            took = min(took, time.monotonic() - t) * 0.8
            shutil.rmtree(ws.raw)
            continue
        assert code == -signal.SIGKILL, log.read_text()[-3000:]
        kills += 1
        plan.append(f"after {delay} s")
        assert not ws.raw.exists(), "a killed crawl left data/raw/"
    code, fig = runner.run("crawl", ws)
    assert code == 0
    ref = data_ws.raw
    assert sorted(p.name for p in ws.raw.iterdir()) == sorted(p.name for p in ref.iterdir())
    import pandas as pd
    log, ref_log = pd.read_parquet(ws.raw / "crawl_log.parquet"), pd.read_parquet(ref / "crawl_log.parquet")
    assert set(log.url) == set(ref_log.url) and fig["attempted"] == len(ref_log)
    from pipeline.data.shards import count_samples, shard_paths
    assert sum(count_samples(p) for p in shard_paths(ws.raw)) == fig["succeeded"] == (log.status == "success").sum()
    left = leftovers(ws.root, before, [ws.raw])
    assert not left, f"crawl: left behind {left}"
    return {"kills": kills, "kill_points": plan, "reruns": kills, "missed_timed_kills": tries - kills,
            "bytes_left_behind": sum(left.values()), "succeeded": int(fig["succeeded"]),
            "reference_succeeded": int((ref_log.status == "success").sum())}


def test_kill_campaign(forkserver, data_ws, smoke_cfg, tmp_path, capsys):
    t0 = time.monotonic()
    runner = Runner(forkserver, smoke_cfg, tmp_path)
    rng = random.Random(SEED)
    t = time.monotonic()
    report = {"crawl": crawl_campaign(runner, data_ws, tmp_path / "crawl_ws", rng)}
    report["crawl"]["seconds"] = round(time.monotonic() - t, 1)
    ws = copy_data(data_ws, tmp_path / "ws", ["corpus", "filtered"])
    for stage in TRAINING:
        t = time.monotonic()
        report[stage] = training_campaign(runner, ws, stage, smoke_cfg, rng)
        report[stage]["seconds"] = round(time.monotonic() - t, 1)
        if stage == "clip":
            code, _ = runner.run("embed", ws)
            assert code == 0
    seconds = round(time.monotonic() - t0, 1)
    with capsys.disabled():
        print(f"\n[kill campaign] seed {SEED}, {seconds} s, {runner.n} stage runs")
        for stage, r in report.items():
            print(f"[kill campaign] {stage:<10} kills {r['kills']} ({', '.join(r['kill_points'])}); "
                  f"reruns {r['reruns']}; bytes left behind {r['bytes_left_behind']}; {r['seconds']} s")
        print(f"[kill campaign] total kills {sum(r['kills'] for r in report.values())}, bytes left behind "
              f"{sum(r['bytes_left_behind'] for r in report.values())}")
    (tmp_path / "campaign.json").write_text(json.dumps(report, indent=1, default=int))
    assert all(r["kills"] >= 5 for r in report.values())

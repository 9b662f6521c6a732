"""Independent stages run side by side (flows/train.py ``run_stages``), sharing the cores
(pipeline/threads.py): the order DVC's graph allows, at most ``cluster.parallel_stages`` at once,
no new stage after a failure, and each running stage's thread share followed between steps."""
from __future__ import annotations

import concurrent.futures
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline import threads
from pipeline.stages import STAGES
from pipeline.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent


def test_shares_split_the_cores_evenly_with_the_remainder_to_the_first_started():
    assert threads.shares([], 2) == {}
    assert threads.shares(["a"], 2) == {"a": 2}
    assert threads.shares(["a", "b"], 2) == {"a": 1, "b": 1}
    assert threads.shares(["a", "b"], 5) == {"a": 3, "b": 2}
    assert threads.shares(["a", "b", "c"], 2) == {"a": 1, "b": 1, "c": 1}     # never 0


def test_a_stage_follows_its_share_and_takes_the_cores_back_when_left_alone(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    cores = threads.ThreadShares(tmp_path / "threads", 2)
    try:
        path = cores.start("decoder")
        assert path.read_text().strip() == "2"
        monkeypatch.setenv(threads.SHARE_ENV, str(path))
        assert threads.follow() in (2, None) and torch.get_num_threads() == 2
        cores.start("prior")                             # a second stage starts: one core each
        assert path.read_text().strip() == "1" and cores.path("prior").read_text().strip() == "1"
        assert threads.follow() == 1 and torch.get_num_threads() == 1
        assert threads.follow() is None                  # unchanged: nothing to do
        cores.end("prior")                               # left alone: both cores back
        assert not cores.path("prior").exists()
        assert threads.follow() == 2 and torch.get_num_threads() == 2
        cores.end("decoder")
        assert threads.follow() is None and torch.get_num_threads() == 2   # the share ended: keep what we have
        monkeypatch.setenv("WORLD_SIZE", "2")            # a rank of a multi-process launch: its own threads
        cores.start("decoder")
        cores.start("prior")
        assert threads.follow() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fit_records_the_steps_where_its_thread_share_changed(tmp_path, monkeypatch):
    """A step's sums depend on the thread count, so the summary says when it changed."""
    from pipeline.training import fit
    before = torch.get_num_threads()
    cores = threads.ThreadShares(tmp_path / "threads", 2)
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv(threads.SHARE_ENV, str(cores.start("decoder")))
        model = torch.nn.Linear(2, 1)

        def after(n):                 # a stage starts beside this one after step 2 and ends after step 4
            if n == 2:
                cores.start("prior")
            if n == 4:
                cores.end("prior")

        batches = iter(lambda: torch.randn(4, 2), None)
        summary = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), None, batches,
                      lambda m, x: m(x).pow(2).mean(), steps=6, after_step=after)
        assert summary["threads"] == [[0, 2], [2, 1], [4, 2]]
    finally:
        torch.set_num_threads(before)


def test_machine_cores_honour_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.machine_cores() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "x")
    assert threads.machine_cores() >= 1


def _dvc_workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / "params.yaml", root)
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    from pipeline import config as config_mod
    config_mod.write_resolved(config_mod.load(root / "params.yaml", "smoke"), root)
    return root


def test_upstream_stages_come_from_dvc_graph(tmp_path):
    from flows.train import upstream_stages
    root = _dvc_workspace(tmp_path)
    up = upstream_stages(root, list(STAGES))
    assert up["corpus"] == set() and up["crawl"] == {"corpus"}
    assert up["judge"] == up["clip"] == {"corpus", "crawl", "filter"}      # side by side after filter
    assert up["decoder"] == up["prior"] == {"corpus", "crawl", "filter", "clip", "embed"}
    assert "judge" not in up["decoder"] and "prior" not in up["decoder"]
    # the upsamplers train on the filtered images (images_from: filtered): beside CLIP, before embed
    assert up["upsample@1"] == up["upsample@2"] == {"corpus", "crawl", "filter"}
    assert up["evaluate"] == set(STAGES) - {"evaluate"}
    # a selection: only the selected stages are waited for
    assert upstream_stages(root, ["judge", "decoder"]) == {"judge": set(), "decoder": set()}
    # no DVC repository: each stage after every stage before it
    plain = tmp_path / "plain"
    plain.mkdir()
    assert upstream_stages(plain, ["a", "b", "c"]) == {"a": set(), "b": {"a"}, "c": {"a", "b"}}


def test_an_upsampler_on_the_embed_stages_shards_waits_for_embed(tmp_path):
    from flows.train import upstream_stages
    root = _dvc_workspace(tmp_path)
    text = (root / "params.yaml").read_text()
    assert text.count("images_from: filtered") == 2
    (root / "params.yaml").write_text(text.replace("images_from: filtered", "images_from: embeddings", 1))
    up = upstream_stages(root, list(STAGES))
    assert up["upsample@1"] == {"corpus", "crawl", "filter", "clip", "embed"}
    assert up["upsample@2"] == {"corpus", "crawl", "filter"}


def test_the_longest_path_to_the_end_ranks_the_ready_stages(tmp_path):
    from flows.train import critical_paths, expected_seconds
    upstream = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"a", "b"}, "e": {"a", "b", "c", "d"}}
    paths = critical_paths(upstream, {"a": 1, "b": 2, "c": 4, "d": 10, "e": 1})
    assert paths == {"e": 1, "d": 11, "c": 5, "b": 13, "a": 14}     # b leads to d: it goes before c
    ws = Workspace.at(tmp_path)
    assert expected_seconds(ws, "decoder") > expected_seconds(ws, "prior")  # never run: the hints' order
    ws.metrics_path("upsample@2").parent.mkdir(parents=True, exist_ok=True)
    ws.metrics_path("upsample@2").write_text('{"duration_s": 12.5}')
    assert expected_seconds(ws, "upsample@2") == 12.5                     # its last run in this workspace
    ws.metrics_path("prior").write_text("not json")
    assert expected_seconds(ws, "prior") == expected_seconds(Workspace.at(tmp_path / "x"), "prior")


class FakeStage:
    """``repro_stage`` stand-in: ``submit`` runs ``seconds[stage]`` of sleep in a thread pool and
    records when each stage ran and with which thread share."""

    def __init__(self, seconds: dict, fail: tuple = ()):
        self.seconds, self.fail = seconds, fail
        self.pool = concurrent.futures.ThreadPoolExecutor(8)
        self.spans: dict[str, tuple[float, float]] = {}
        self.share: dict[str, str] = {}
        self.lock = threading.Lock()

    def submit(self, stage, workspace, env, force=False):
        return self.pool.submit(self._run, stage, env)

    def _run(self, stage, env):
        from flows.train import StageFailed
        t0 = time.perf_counter()
        shares = set()
        while time.perf_counter() < t0 + self.seconds.get(stage, 0.05):
            try:
                shares.add(Path(env[threads.SHARE_ENV]).read_text().strip())     # as a training step reads it
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        with self.lock:
            self.spans[stage], self.share[stage] = (t0, time.perf_counter()), shares
        if stage in self.fail:
            raise StageFailed(stage, f"stage {stage!r} failed (bad input)", True)
        return {"stage": stage, "status": "ran", "seconds": 0.0, "figures": {}}


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.parametrize("parallel", [1, 2])
def test_run_stages_runs_independent_stages_side_by_side_in_dependency_order(tmp_path, monkeypatch, parallel):
    from flows import train
    root = _dvc_workspace(tmp_path)
    fake = FakeStage({"judge": 0.3, "clip": 1.5, "prior": 0.3, "decoder": 0.8, "upsample@1": 0.2,
                      "upsample@2": 0.2})
    monkeypatch.setattr(train, "repro_stage", fake)
    monkeypatch.setattr(train, "as_completed", concurrent.futures.as_completed)
    monkeypatch.setattr(train, "machine_cores", lambda: 2)
    rows, failed = train.run_stages(Workspace.at(root), list(STAGES), {}, False, parallel)
    assert failed is None and [r["stage"] for r in rows] == list(STAGES) and {r["status"] for r in rows} == {"ran"}
    span = fake.spans
    for stage, ups in train.upstream_stages(root, list(STAGES)).items():    # never before what it depends on
        assert all(span[u][1] <= span[stage][0] for u in ups), stage
    running_at = [sum(s[0] <= t < s[1] for s in span.values()) for t in (x[0] + 1e-3 for x in span.values())]
    assert max(running_at) == parallel                                      # never more than allowed
    if parallel == 2:
        assert _overlap(span["judge"], span["clip"]) and _overlap(span["decoder"], span["prior"])
        assert all(_overlap(span[u], span["clip"]) for u in ("upsample@1", "upsample@2"))   # beside CLIP
        assert span["decoder"][0] <= span["prior"][0]                       # the longest lane first
        assert "1" in fake.share["judge"] and "1" in fake.share["clip"]     # side by side: one core each
        assert "2" in fake.share["clip"]                                    # the others done: both back
        assert fake.share["corpus"] == fake.share["evaluate"] == {"2"}      # alone: both
    else:
        assert set().union(*fake.share.values()) == {"2"}


def test_each_round_writes_the_shares_once_so_no_stage_sees_a_passing_share(tmp_path, monkeypatch):
    """A stage that ends and the one that starts in its place change no other stage's share: before,
    CLIP's file read 2 between the judge's end and upsample@1's start, and a CLIP step taken at two
    threads would train another CLIP (the thread count changes a step's sums)."""
    from flows import train
    written: dict[str, list[str]] = {}
    write = threads.atomic_write_bytes

    def recording(path, data):
        written.setdefault(Path(path).name.removesuffix(".threads"), []).append(data.decode().strip())
        write(path, data)

    monkeypatch.setattr(threads, "atomic_write_bytes", recording)
    root = _dvc_workspace(tmp_path)
    fake = FakeStage({"clip": 1.0, "upsample@2": 0.1, "judge": 0.1, "upsample@1": 0.1, "decoder": 0.5})
    monkeypatch.setattr(train, "repro_stage", fake)
    monkeypatch.setattr(train, "as_completed", concurrent.futures.as_completed)
    monkeypatch.setattr(train, "machine_cores", lambda: 2)
    rows, failed = train.run_stages(Workspace.at(root), list(STAGES), {}, False, 2)
    assert failed is None
    assert written["clip"] == ["1", "2"]        # one core beside the upsamplers and the judge, then both, once
    assert written["decoder"] == ["1", "2"]     # beside the prior, then both
    assert written["filter"] == ["2"]           # alone


def test_run_stages_starts_nothing_after_a_failure_and_lets_the_running_finish(tmp_path, monkeypatch):
    from flows import train
    root = _dvc_workspace(tmp_path)
    fake = FakeStage({"judge": 0.05, "clip": 0.5}, fail=("judge",))
    monkeypatch.setattr(train, "repro_stage", fake)
    monkeypatch.setattr(train, "as_completed", concurrent.futures.as_completed)
    rows, failed = train.run_stages(Workspace.at(root), list(STAGES), {}, False, 2)
    status = {r["stage"]: r["status"] for r in rows}
    assert failed is not None and failed.stage == "judge" and failed.permanent
    assert status["judge"] == "failed" and status["clip"] == "ran"          # clip was running: it finished
    assert {status[s] for s in ("embed", "prior", "decoder", "evaluate")} == {"not run"}
    assert "filter" in fake.spans and "embed" not in fake.spans

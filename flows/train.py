"""The training flow: every stage, each a Prefect task that runs `dvc repro <stage>`.

Stages that do not depend on each other (DVC's graph of dvc.yaml) run side by side, at most
``cluster.parallel_stages`` at once, each as soon as its upstream stages are done; of the stages
ready, the one with the longest path of expected seconds to the end of the run first (the
decoder's lane; the upsamplers, which need only the filtered images, fill the other core beside
CLIP).
The running stages share the machine's cores (pipeline/threads.py): on 2 cores each of two gets
one thread, and one left alone takes both back at its next step. On 2 cores that does 1.3 to 1.6
times the work of one stage at two threads (docs/MEASURED.md, 2026-12-04 sixth session).

DVC decides whether a stage is stale (so a second run does nothing): the flow writes the
resolved configuration of its profile to ``params.resolved.json`` once, before the first stage,
and DVC compares each stage's sections of it with ``dvc.lock``. The flow holds the
workspace's lock (``.unclip/run.lock``, :mod:`pipeline.lock`) from start to end, so a second run,
stage or promote on the same workspace fails at once with the holder's pid; its stage children
run under it. A stage that fails permanently (exit code 2 from `unclip stage`, read from the
record it writes, ``.unclip/exit/<stage>.json``, never from its log) is not retried; anything else
is retried per the task's policy. A task that is cancelled or interrupted kills its `dvc repro`
(and the stage under it) before it returns. MLflow gets one parent run per flow run; the stage
subprocesses attach their nested runs to it through ``UNCLIP_PARENT_RUN_ID``. The flow ends by
publishing a table artifact of every stage's figures.

Served (``flows/deploy.py``), the flow's parameters come from the Prefect API: it refuses a
``workspace`` other than the one the deployment pinned (:data:`SERVE_WORKSPACE_ENV`) and stage
names it does not know, before it runs anything.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed

from pipeline import config as config_mod
from pipeline import storage, tracking
from pipeline.lock import WorkspaceBusy, workspace_lock
from pipeline.stages import EXIT_TOKEN_ENV, read_exit, registry
from pipeline.threads import SHARE_ENV, ThreadShares, machine_cores
from pipeline.workspace import Workspace

RETRIES = 2
RETRY_DELAY_S = 5
# Set by flows/deploy.py when serving: the one workspace that runs from the API may use.
SERVE_WORKSPACE_ENV = "UNCLIP_SERVE_WORKSPACE"
KILL_GRACE_S = 10


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str, permanent: bool):
        super().__init__(message)
        self.stage, self.permanent = stage, permanent


def _retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry unless the stage said its input or config is bad."""
    try:
        state.result()
    except StageFailed as err:
        return not err.permanent
    except Exception:  # noqa: BLE001 - anything unexpected is worth another try
        return True
    return False


def stage_env(profile: str, parent_run_id: Optional[str]) -> dict:
    bindir = str(Path(sys.executable).parent)       # `unclip` and `dvc` of this environment
    env = {**os.environ, config_mod.PROFILE_ENV: profile, "DVC_NO_ANALYTICS": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    return env


def run_logged(cmd: list[str], cwd: str, env: dict, log: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run ``cmd``, passing each line of its output to ``log`` as it comes (progress bars redraw
    with \r: each redraw becomes a line); returns (exit code, lines).

    The command runs in its own process group; if this returns by an exception (the task
    cancelled, Ctrl-C, SIGTERM turned into an exception by Prefect) the whole group is stopped
    (SIGTERM, then SIGKILL after :data:`KILL_GRACE_S`), so no orphaned `dvc repro` keeps running
    and holding DVC's lock."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    lines: list[str] = []
    try:
        for chunk in proc.stdout:
            for line in chunk.replace("\r", "\n").splitlines():
                if line.strip():
                    lines.append(line)
                    log(line)
        return proc.wait(), lines
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        proc.stdout.close()
        with _LIVE_LOCK:
            _LIVE.discard(proc)


# The `dvc repro` process groups running now. Side by side, stages run in the task runner's
# threads: an interrupt reaches the flow's own thread, which stops these (:func:`stop_all`).
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def stop_all() -> None:
    """Stop every running stage's process group (SIGTERM, then SIGKILL after the grace)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        if proc.poll() is None:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the group may outlive its leader (a stage under dvc): make sure it is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_retry_transient,
      task_run_name="{stage}")
def repro_stage(stage: str, workspace: str, env: dict, force: bool = False) -> dict:
    """`dvc repro --single-item <stage>`; returns whether it ran and its figures."""
    logger = get_run_logger()
    # --wait-for-lock: side by side, two `dvc repro` take DVC's repo lock in turn (each holds it
    # only to check and to record its stage, not while the stage runs)
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item",
           *(["--force"] if force else []), stage]
    t0 = time.perf_counter()
    token = uuid.uuid4().hex               # this attempt's: `unclip stage` signs its exit record with it
    returncode, lines = run_logged(cmd, workspace, {**env, EXIT_TOKEN_ENV: token}, logger.info)
    seconds = round(time.perf_counter() - t0, 1)
    out = "\n".join(lines)
    if returncode != 0:
        record = read_exit(workspace, stage, token)
        permanent = bool(record and record.get("permanent"))
        tail = "\n".join(lines[-15:])
        why = f"\n{record['error']}" if permanent and record.get("error") and record["error"] not in tail else ""
        raise StageFailed(stage, f"stage {stage!r} failed ({'bad input' if permanent else 'will retry'}):\n{tail}{why}",
                          permanent)
    ran = f"Running stage '{stage}'" in out
    metrics_path = Workspace.at(workspace).metrics_path(stage)
    figures = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    # "n/a": a stage that does not apply to this data (the corpus beside a URL list, the judge
    # without ground truth); its figures say why (pipeline/truth.py)
    status = "n/a" if figures.get("skipped") else "ran" if ran else "skipped"
    return {"stage": stage, "status": status, "seconds": seconds, "figures": figures}


def headline(stage: str, f: dict) -> str:
    """One line of a stage's figures for the summary table (:data:`HEADLINES`, per stage)."""
    if not f:
        return ""
    if f.get("skipped"):
        return f"not run: {f['skipped']}"
    line = HEADLINES.get(stage.split("@")[0])
    return line(f) if line else ""


def _nonzero(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v)


def _corpus(f: dict) -> str:
    return f"{f.get('scenes')} scenes, {f.get('urls')} URLs, faults {sum(f.get('faults', {}).values())}"


def _crawl(f: dict) -> str:
    return f"{f.get('succeeded')}/{f.get('attempted')} ok; failed " + _nonzero(f.get("failed_by_reason", {}))


def _filter(f: dict) -> str:
    squared = sum((f.get("squared") or {}).values())
    return (f"{f.get('kept')}/{f.get('input')} kept; dropped " + _nonzero(f.get("dropped_by_reason", {}))
            + (f"; {squared} made square ({', '.join(f.get('squared'))})" if squared else ""))


def _clip(f: dict) -> str:
    zs, v = f.get("val", {}).get("zero_shot", {}), f.get("val", {})
    if not zs:
        return (f"val R@1 i->t {v.get('image_to_text_r@1')}%, t->i {v.get('text_to_image_r@1')}% "
                f"({v.get('n_pairs')} pairs; zero-shot attributes need ground truth)")
    return (f"zero-shot color {zs.get('color_acc')}%, shape {zs.get('shape_acc')}%, "
            f"position {zs.get('position_acc')}%; R@1 i->t {v.get('image_to_text_r@1')}%")


def _embed(f: dict) -> str:
    cut = f.get("captions_truncated")
    return (f"{f.get('kept')} embedded ({f.get('dropped_low_similarity')} dropped), {f.get('images_per_s')} img/s"
            + (f"; {cut} captions cut at CLIP's context" if cut else ""))


def _prior(f: dict) -> str:
    v = f.get("val", {})
    return (f"val cos(pred, image) {v.get('cos_pred_image')} vs cos(text, image) "
            f"{v.get('cos_image_text_baseline')}, unrelated {v.get('cos_unrelated_image')}")


def _decoder(f: dict) -> str:
    v = f.get("val", {})
    return f"val cos(CLIP(decoded), z_i) {v.get('cos_reembed')} (real {v.get('cos_reembed_real')})"


def _upsample(f: dict) -> str:
    v = f.get("val", {})
    return f"val PSNR {v.get('psnr_db')} dB (bicubic {v.get('bicubic_psnr_db')} dB)"


def _judge(f: dict) -> str:
    return "real test images: " + ", ".join(f"{k} {v}%" for k, v in f.get("test_accuracy", {}).items())


def _evaluate(f: dict) -> str:
    if f.get("ground_truth") is False:
        std, abl = f.get("standard", {}), f.get("ablation", {})
        return (f"no ground truth, nothing judged; {std.get('metric')} {std.get('fid')} "
                f"(real vs real {std.get('fid_floor_real_vs_real')}), CLIP score {f.get('clip_score_final')} "
                f"(real images {f.get('clip_score_real_images')}); ablation {std.get('metric')}: "
                + ", ".join(f"{v} {a.get('standard', {}).get('fid')}" for v, a in abl.items())
                + f"; {f.get('nfe_total')} NFE/image")
    s, p = f.get("quality", {}).get("single", {}), f.get("quality", {}).get("pair", {})
    missed = [k for k, b in f.get("bars", {}).items() if not b.get("ok")]
    return (f"one object: color {s.get('color')}% shape {s.get('shape')}% size {s.get('size')}% "
            f"position {s.get('position')}%; two: colors {p.get('colors')}% relation {p.get('relation')}%; "
            f"FD {f.get('quality', {}).get('frechet_distance')} (floor {f.get('frechet_floor_real_vs_real')}); "
            f"{f.get('nfe_total')} NFE/image; " + (f"missed: {', '.join(missed)}" if missed else "all bars met"))


# A stage's headline from its figures, by stage (upsample@<key>: "upsample").
HEADLINES: dict[str, Callable[[dict], str]] = {
    "corpus": _corpus, "crawl": _crawl, "filter": _filter, "judge": _judge, "clip": _clip, "embed": _embed,
    "prior": _prior, "decoder": _decoder, "upsample": _upsample, "evaluate": _evaluate}


def how(stage: str, status: str, f: dict) -> str:
    """How a stage that ran treated the last run's output: incremental data, kept, continued."""
    if status != "ran" or not f:
        return ""
    inc, rt = f.get("incremental"), f.get("retrain")
    if inc:
        if inc.get("part") is None:
            return "nothing new"
        new = {"crawl": f"{inc.get('new_urls')} new URLs", "filter": f"{inc.get('new_raw_shards')} new shard(s)",
               "embed": f"{inc.get('new_filtered_shards')} new shard(s)"}.get(stage, "")
        return f"part {inc['part']}: {new}" if inc["part"] else f"all ({inc.get('why') or 'first run'})"
    if rt:
        if rt["mode"] == "continued":
            return f"continued: {rt['steps']} steps from the last weights"
        if rt["mode"] == "kept":
            return "kept (data grew; retrain: keep)"
        return "from scratch" + (f" ({rt['why']})" if rt.get("why") else "")
    return ""


@task(task_run_name="promote")
def promote_task(cfg, ws: Workspace, parent_run_id: str) -> dict:
    """Register the evaluated bundle in MLflow's model registry; the gate decides the alias."""
    from pipeline import registry
    t0 = time.perf_counter()
    verdict = registry.register_and_gate(cfg, ws, parent_run_id=parent_run_id)
    line = registry.describe(verdict)
    get_run_logger().info(line)
    return {"stage": "promote", "status": "promoted" if verdict["promoted"] else "candidate",
            "seconds": round(time.perf_counter() - t0, 1), "figures": verdict, "line": line}


@flow(name="unclip-train", log_prints=True)
def train_flow(workspace: str = ".", profile: str = config_mod.DEFAULT_PROFILE, force: bool = False,
               stages: Optional[list[str]] = None) -> dict:
    """Run the pipeline's stages in order through DVC; returns (and publishes) the summary."""
    ws = Workspace.at(workspace)
    check_workspace(ws)
    cfg = config_mod.load(ws.params, profile)          # validate before any work starts
    known = list(registry(cfg))                         # upsample@<key> per upsampler of params.yaml
    check_stages(stages, known)
    selected = stages or known
    try:
        with workspace_lock(ws.root, f"unclip run (flow, profile {cfg.profile})"):
            return _train(ws, cfg, selected, force)
    except WorkspaceBusy as err:
        raise StageFailed("workspace", str(err), permanent=True) from None


def check_workspace(ws: Workspace) -> None:
    """Refuse, before anything is read, a workspace the API may not use (a permanent failure)."""
    pinned = os.environ.get(SERVE_WORKSPACE_ENV)
    if pinned and ws.root != Path(pinned).resolve():
        raise StageFailed("workspace", f"workspace {str(ws.root)!r} refused: this deployment serves only "
                                       f"{str(Path(pinned).resolve())!r}", permanent=True)


def check_stages(stages: Optional[list[str]], known: list[str]) -> None:
    """Refuse, before anything runs, stage names the pipeline does not have (a permanent failure)."""
    unknown = [s for s in (stages or []) if s not in known]
    if unknown or (stages is not None and not isinstance(stages, list)):
        raise StageFailed("stages", f"unknown stage(s) {unknown or stages!r} (known: {', '.join(known)})",
                          permanent=True)


def in_turn(selected: list[str]) -> dict[str, set[str]]:
    """Each stage after every stage before it: the stages one after another."""
    return {stage: set(selected[:i]) for i, stage in enumerate(selected)}


def upstream_stages(root: Path, selected: list[str]) -> dict[str, set[str]]:
    """For each of ``selected``, the selected stages it depends on, directly or through others, by
    DVC's own graph of the workspace's dvc.yaml. Where DVC cannot give it, each stage depends on
    every stage before it (the stages run in turn)."""
    try:
        import networkx as nx
        from dvc.repo import Repo
        with Repo(str(root)) as repo:
            graph = repo.index.graph                         # an edge runs from a stage to one it depends on
            name = {node: getattr(node, "name", None) or node.addressing for node in graph.nodes}
            deps = {name[node]: {name[d] for d in nx.descendants(graph, node)} for node in graph.nodes}
    except Exception:  # noqa: BLE001 - no DVC graph: the safe order
        return in_turn(selected)
    chosen, safe = set(selected), in_turn(selected)
    return {stage: deps.get(stage, safe[stage]) & chosen for stage in selected}


# Each stage's seconds in a fresh-clone `make run` of the default profile (docs/MEASURED.md, thirteenth session:
# 2 cores, AVX2): a workspace whose stage has never run (no metrics/<stage>.json) takes its expected
# time from here (upsample@<key>: the mean of the two upsamplers' 624 and 233 s). Only their order
# matters: they rank the stages that are ready to start.
HINT_SECONDS = {"corpus": 35, "crawl": 57, "filter": 22, "judge": 486, "clip": 778, "embed": 15,
                "prior": 368, "decoder": 1414, "upsample": 430, "evaluate": 165}


def expected_seconds(ws: Workspace, stage: str) -> float:
    """How long ``stage`` is expected to take: its last run's ``duration_s`` in this workspace,
    else :data:`HINT_SECONDS` (per kind of stage: upsample@<key> as upsample)."""
    try:
        return float(json.loads(ws.metrics_path(stage).read_text())["duration_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return float(HINT_SECONDS.get(stage.split("@")[0], 60))


def critical_paths(upstream: dict[str, set[str]], seconds: dict[str, float]) -> dict[str, float]:
    """Each stage's longest chain of expected seconds from its start to the end of the run, itself
    included: the stage and the longest path among the stages that depend on it."""
    below = {s: [d for d, ups in upstream.items() if s in ups] for s in upstream}
    memo: dict[str, float] = {}

    def path(stage: str) -> float:
        if stage not in memo:
            memo[stage] = seconds[stage] + max((path(d) for d in below[stage]), default=0.0)
        return memo[stage]
    return {s: path(s) for s in upstream}


def run_stages(ws: Workspace, selected: list[str], env: dict, force: bool, parallel: int
               ) -> tuple[list[dict], Optional[StageFailed]]:
    """Run ``selected`` through :func:`repro_stage`: a stage starts once every selected stage it
    depends on is done, at most ``parallel`` at once, the cores shared between the running ones
    (:class:`ThreadShares`). Of the stages ready to start, the one with the longest path of
    expected seconds to the end of the run starts first (:func:`critical_paths`; critical-path
    list scheduling), ties in stage order: the decoder before the prior, so the longest lane
    starts as soon as embed is done and the shorter stages fill the other core. After a failure
    no new stage starts; the running ones finish. Returns the rows in stage order and the first
    failure."""
    upstream = upstream_stages(ws.root, selected) if parallel > 1 else in_turn(selected)
    longest = critical_paths(upstream, {s: expected_seconds(ws, s) for s in selected})
    cores = ThreadShares(ws.root / ".unclip" / "threads", machine_cores())
    pending = sorted(selected, key=lambda s: -longest[s])      # stable: ties keep the stage order
    running, done = {}, {}
    failed: Optional[StageFailed] = None
    try:
        while pending or running:
            starting = []
            for stage in [] if failed else list(pending):
                if len(running) + len(starting) >= parallel:
                    break
                if upstream[stage] & (set(pending) | set(running.values()) | set(starting)):
                    continue                                 # waits for a stage it depends on
                pending.remove(stage)
                starting.append(stage)
                cores.start(stage, publish=False)
            # Every share written once per round, after the ends and starts: a running stage reads
            # its share between steps, and one step at a passing thread count changes its sums.
            cores.publish()
            for stage in starting:
                share = str(cores.path(stage))
                running[repro_stage.submit(stage, str(ws.root), {**env, SHARE_ENV: share}, force)] = stage
            if not running:
                break
            future = next(as_completed(list(running)))
            stage = running.pop(future)
            cores.end(stage, publish=False)
            try:
                done[stage] = future.result()
            except Exception as err:  # noqa: BLE001 - StageFailed after its retries, or the task crashed
                err = err if isinstance(err, StageFailed) else StageFailed(stage, f"{type(err).__name__}: {err}", False)
                failed = failed or err
                done[stage] = {"stage": stage, "status": "failed", "seconds": 0, "figures": {}, "error": str(err)}
    except BaseException:                    # interrupted or cancelled: no stage outlives the flow
        stop_all()
        raise
    rows = [done.get(stage) or {"stage": stage, "status": "not run", "seconds": 0, "figures": {}}
            for stage in selected]
    return rows, failed


def _train(ws: Workspace, cfg, selected: list[str], force: bool) -> dict:
    # The resolved configuration, once per run, where DVC sees it (each stage's params): a changed
    # profile or parameter is a changed value, and DVC alone decides what is stale.
    config_mod.write_resolved(cfg, ws.root)
    storage.check_workspace(ws)        # objects changed under cluster.storage: their stage is stale for DVC
    with tracking.start_run(cfg, ws.root, f"pipeline[{cfg.profile}]") as parent:
        env = stage_env(cfg.profile, parent.info.run_id)
        rows, failed = run_stages(ws, selected, env, force, cfg.cluster.parallel_stages)
        # the promotion gate, when this run produced a new evaluation
        evaluated = any(r["stage"] == "evaluate" and r["status"] == "ran" for r in rows)
        if not failed and evaluated and cfg.promote.enabled:
            from pipeline.registry import GateError
            try:
                rows.append(promote_task(cfg, ws, parent.info.run_id))
            except GateError as err:     # a rule on a figure this evaluation lacks: the config's fault
                failed = StageFailed("promote", f"promotion gate: {err}", permanent=True)
                rows.append({"stage": "promote", "status": "failed", "seconds": 0, "figures": {}, "error": str(err)})
        table = [{"stage": r["stage"], "status": r["status"], "seconds": r["seconds"],
                  "how": how(r["stage"], r["status"], r["figures"]),
                  "figures": r.get("line") or headline(r["stage"], r["figures"]) or r.get("error", "")[:300]}
                 for r in rows]
        tracking.log_metrics({"stages_ran": sum(r["status"] == "ran" for r in rows),
                              "stages_failed": sum(r["status"] == "failed" for r in rows)})
        import mlflow
        mlflow.log_dict({"stages": table}, "summary.json")
    create_table_artifact(key="unclip-pipeline-summary", table=table,
                          description=f"unclip pipeline, profile {cfg.profile}, workspace {ws.root}")
    width = max(len(r["stage"]) for r in table)
    print("\n".join(f"{r['stage']:<{width}}  {r['status']:<8} {r['seconds']:>7.1f} s  "
                    + (f"[{r['how']}] " if r["how"] else "") + r["figures"] for r in table))
    summary = {"profile": cfg.profile, "workspace": str(ws.root), "stages": rows,
               "mlflow_parent_run_id": parent.info.run_id}
    if failed:
        raise failed
    return summary


if __name__ == "__main__":
    train_flow()

"""The kill campaign's child: one stage run in a forked process (forkserver: a clean process that
has imported the stage modules once, so a child starts in milliseconds instead of seconds)."""
from __future__ import annotations

import json
import os
import sys
import traceback

PRELOAD = ["pipeline.stages", "pipeline.data.crawl", "pipeline.clip.stage", "pipeline.embed", "pipeline.prior.stage",
           "pipeline.decoder.stage", "pipeline.upsampler.stage", "pipeline.judge.stage"]


def run_stage_child(stage: str, cfg, ws, kill_at: str | None, result: str, log: str) -> None:
    """Run ``stage`` in its own process group; its figures to ``result``; output to ``log``.
    ``kill_at``: $UNCLIP_KILL_AT for this run (the phase at which it SIGKILLs itself)."""
    os.setpgid(0, 0)                      # the parent kills the whole group (img2dataset's workers too)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        import multiprocessing
        multiprocessing.set_start_method("fork", force=True)   # the stages' own workers: as in a CLI run
        from pipeline.stages import stage_function
        from pipeline.workspace import KILL_ENV
        if kill_at:
            os.environ[KILL_ENV] = kill_at
        else:
            os.environ.pop(KILL_ENV, None)
        os.chdir(ws.root)
        figures = stage_function(stage, cfg)(cfg, ws)
        with open(result, "w") as f:
            json.dump(figures, f, default=str)
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

"""No credentials in artifacts (issue 19, M9): a tracking URI with a user, a token or a signed
query is never written into saved models (which go to the registry), report snapshots or pages,
and URLs echoed in crawl failure messages lose their credentials and queries."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import yaml

from pipeline import config
from pipeline.stages import run_stage
from pipeline.tracking import redact_uri, redact_urls_in
from pipeline.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
LEAKY = "https://alice:SECRET-pw@mlflow.example:5000/base?token=SECRET-q"


def test_redact_uri():
    assert redact_uri(LEAKY) == "https://***@mlflow.example:5000/base?<redacted>"
    assert redact_uri("sqlite:////tmp/ws/mlflow.db") == "sqlite:////tmp/ws/mlflow.db"
    assert redact_uri("databricks") == "databricks" and redact_uri(None) is None
    msg = "<urlopen error unknown url type: 'ftp://u:SECRET@h/x.png?X-Amz-Signature=SECRET'>"
    assert "SECRET" not in redact_urls_in(msg) and "ftp://***@h/x.png" in redact_urls_in(msg)


def test_tracking_uri_credentials_never_written(data_ws, tmp_path, monkeypatch):
    """tracking.tracking_uri holds credentials (MLFLOW_TRACKING_URI, set for the tests, is what
    MLflow uses): train two stages, snapshot and render a report, grep every file for SECRET."""
    from helpers.fake_eval import fake_evaluation
    from pipeline import report
    import importlib
    snapshot_mod = importlib.import_module("pipeline.report.snapshot")    # (the package exports the function)
    ws = Workspace.at(tmp_path / "ws")
    (ws.root / "data").mkdir(parents=True)
    for part in ("corpus", "filtered"):
        shutil.copytree(data_ws.root / "data" / part, ws.root / "data" / part)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"] = {**params.get("tracking", {}), "tracking_uri": LEAKY}
    ws.params.write_text(yaml.safe_dump(params))
    cfg = config.load(ws.params, "smoke")
    monkeypatch.chdir(ws.root)
    for stage in ("judge", "clip"):                  # model.json (every bundle.save_model) and the CLIP's run_config.json
        run_stage(stage, cfg, ws)
    fake_evaluation(ws, seed=0, color=50.0, fid=10.0)
    monkeypatch.setattr(snapshot_mod, "training_curves", lambda *args: {})       # no server to ask
    run_dir = snapshot_mod.snapshot(cfg, ws, tracking_uri=LEAKY)
    page = report.build(ws, run_dir.name)
    assert "mlflow.example" in Path(page).read_text()                 # where the store is: still shown
    # crawl failure messages that echo a signed URL
    log = pd.DataFrame({"status": ["failed"], "reason": ["other"],
                        "error_message": ["unknown url type: 'ftp://bob:SECRET@h/a.png?sig=SECRET'"]})
    from pipeline.data.crawl import failure_metrics, tally
    (ws.metrics_dir / "crawl_fail.json").write_text(str(failure_metrics(*tally(log, log, None))))
    leaks = [str(p.relative_to(ws.root)) for p in ws.root.rglob("*")
             if p.is_file() and p.name != "params.yaml" and b"SECRET" in p.read_bytes()]
    assert not leaks, leaks
    assert (ws.judge / "model.json").exists() and (ws.clip / "run_config.json").exists()

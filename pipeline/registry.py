"""The promotion gate: every evaluated bundle is registered in MLflow's model registry; it becomes
the champion (``promote.alias``) only if it is not worse than the current one.

A registered version's source is an MLflow Model in the ``promote`` run's artifacts
(``<run>/model``, see ``pipeline.serving``): a pyfunc flavor from code, so
``mlflow.pyfunc.load_model("models:/<name>@<alias>")`` and `mlflow models serve` take it, carrying
the bundle that ``generate.Unclip.load`` reads (``clip/ prior/ decoder/ upsampler_*/``, safetensors)
under ``artifacts/bundle/`` and its ``evaluate.json`` beside the MLmodel file. Versions
registered before that point at a raw bundle folder (``<run>/bundle``, ``evaluate.json`` inside);
``champion_models`` and the gate read both. A version's tags name the report run
(``reports/<run>/``), the git revision and the gate's verdict. The rules are ``promote.rules`` for an evaluation with ground truth (the judge's
figures) and ``promote.rules_without_ground_truth`` for one without (a user's URL list); a rule
naming a figure the evaluation does not have stops the gate with a :class:`GateConfigError`
before anything is registered, on the first run (no champion) as on any other. ``unclip generate`` and the applications load ``models:/<name>@<alias>`` unless
told otherwise (``champion_models``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from . import bundle as bundle_mod, tracking
from .serving import mlflow_model
from .tracking import flatten
from .workspace import Workspace

MODEL_ARTIFACT = "model"                           # the MLflow Model's folder in the promote run's artifacts


class GateError(RuntimeError):
    """Nothing to register (no trained bundle or no evaluation)."""


class GateRegistryError(GateError):
    """The registry could not say who the champion is, or what it measured: the gate fails closed
    (the candidate is not promoted) rather than treat an error as "no champion"."""


class GateConfigError(GateError):
    """A rule names a figure the evaluation does not have: a configuration error, never a pass."""


def rules_for(gate, evaluation: dict) -> tuple[str, list]:
    """(the params key, its rules) that apply to ``evaluation``: ``promote.rules`` where the data
    has ground truth (judged figures), ``promote.rules_without_ground_truth`` where it has none."""
    if evaluation.get("ground_truth", True):
        return "promote.rules", list(gate.rules)
    return "promote.rules_without_ground_truth", list(gate.rules_without_ground_truth)


def check_rules(key: str, rules, evaluation: dict) -> None:
    """Every rule must name a number of ``evaluation``; else a GateConfigError naming the rule,
    why the figure is absent and what the rule could name instead."""
    flat = flatten(evaluation)
    bad = [(k, r.metric) for k, r in enumerate(rules) if not isinstance(flat.get(r.metric), (int, float))
           or isinstance(flat.get(r.metric), bool)]
    if not bad:
        return
    why = (f" (this evaluation has no ground truth: {evaluation['not_measured']['why']})"
           if not evaluation.get("ground_truth", True) else "")
    numbers = sorted(k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    shown = [k for k in numbers if k.startswith(("standard.", "clip_score", "quality.", "prior."))] or numbers
    raise GateConfigError(
        "; ".join(f"{key}[{k}]: {m!r} is not a figure of metrics/evaluate.json" for k, m in bad) + why
        + f". Figures a rule can name include: {', '.join(shown[:24])}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def decide(candidate: dict, champion: Optional[dict], rules) -> tuple[bool, list[str], list[dict]]:
    """(promote?, reasons, rows) for two ``metrics/evaluate.json`` dicts under the gate's rules.
    A candidate whose rule figures are not all finite is never promoted, not even as the first
    version (a NaN champion could never be replaced: every comparison with NaN fails). No
    champion: promote. A figure missing on either side cannot pass its rule."""
    fc = flatten(candidate)
    bad = [f"{r.metric}: missing or not a finite number (candidate {fc.get(r.metric)})" for r in rules
           if not _finite(fc.get(r.metric))]
    if bad:
        return False, bad, []
    if champion is None:
        return True, ["no champion yet"], []
    fo = flatten(champion)
    rows, reasons = [], []
    for r in rules:
        new, old = fc.get(r.metric), fo.get(r.metric)
        if not _finite(new) or not _finite(old):
            ok, delta = False, None
            reasons.append(f"{r.metric}: missing or not finite (candidate {new}, champion {old})")
        else:
            delta = new - old
            loss = -delta if r.higher_is_better else delta
            ok = loss <= r.tolerance
            if not ok:
                reasons.append(f"{r.metric}: {new} vs champion {old} "
                               f"({'lower' if r.higher_is_better else 'higher'} by {abs(delta):.4g} > tolerance {r.tolerance})")
        rows.append({"metric": r.metric, "candidate": new, "champion": old, "delta": delta,
                     "higher_is_better": r.higher_is_better, "tolerance": r.tolerance, "ok": ok})
    promote = all(row["ok"] for row in rows)
    return promote, (reasons or ["not worse on any rule"]), rows


def _client(cfg, ws: Workspace):
    import mlflow
    tracking._setup(cfg, ws.root)
    return mlflow.MlflowClient()


def champion_version(client, name: str, alias: str):
    """The version holding ``alias``, or None when the model or the alias does not exist. Any other
    registry error (connection, permission, server) raises GateRegistryError: "no champion"
    would promote whatever comes next."""
    from mlflow.exceptions import MlflowException
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(err).lower()):
            return None          # no such registered model / no version holds the alias yet
        raise GateRegistryError(f"the model registry could not say which version is @{alias} of {name}: "
                                f"{err.error_code}: {err}") from None


def _evaluation_of(version) -> dict:
    """The champion's evaluate.json; GateRegistryError when it cannot be read (the gate then
    refuses the candidate unless promote.replace_unreadable is set)."""
    import mlflow
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=version.source.rstrip("/") + "/evaluate.json")
        return json.loads(Path(path).read_text())
    except Exception as err:
        raise GateRegistryError(f"the champion (version {version.version}) has no readable evaluation "
                                f"({type(err).__name__}: {err})") from None


def check_bundle(evaluation: dict, models: Path) -> None:
    """The models about to be registered must be the ones ``evaluation`` measured (its ``bundle``
    digests, written by evaluate): a stage rerun after evaluate, or another run's models, is a
    GateError, never a registration on someone else's figures."""
    measured = evaluation.get("bundle")
    if not isinstance(measured, dict):
        raise GateError("metrics/evaluate.json does not say which weights it measured (written before the gate "
                        "checked it): run the evaluate stage again (`unclip stage evaluate`), then promote")
    now = bundle_mod.digests(models)
    changed = sorted(k for k in set(measured) | set(now) if measured.get(k) != now.get(k))
    if changed:
        raise GateError(f"models changed since evaluate measured them: {', '.join(changed)} (sha256 differs "
                        f"or the part is new/missing): run the evaluate stage again, then promote")


def register_and_gate(cfg, ws: Workspace, *, report_run: Optional[str] = None,
                      parent_run_id: Optional[str] = None) -> dict:
    """Register the workspace's bundle and evaluation as a new version; move the alias to it if the
    gate passes; tag it with the verdict. Returns the verdict (and the comparison page's path when
    it was refused and both runs have report snapshots)."""
    import mlflow
    gate = cfg.promote
    models = ws.root / "models"
    parts = bundle_mod.parts(models)
    missing = [str(x.relative_to(ws.root)) for x in parts if not (x / "model.safetensors").exists()]
    ev_path = ws.metrics_path("evaluate")
    if missing or not ev_path.exists():
        raise GateError(f"nothing to register: missing {', '.join(missing) or 'metrics/evaluate.json'}")
    evaluation = json.loads(ev_path.read_text())
    rules_key, rules = rules_for(gate, evaluation)
    check_rules(rules_key, rules, evaluation)            # before anything is registered
    check_bundle(evaluation, models)
    client = _client(cfg, ws)
    if report_run is None:
        from .report import runs
        snaps = runs(ws)
        report_run = snaps[-1].name if snaps else None

    with tracking.start_run(cfg, ws.root, "promote", stage="promote",
                            parent_run_id=parent_run_id or os.environ.get(tracking.PARENT_ENV)) as run:
        source = log_bundle(cfg, ws, parts, ev_path, report_run, client, run)
        try:
            client.get_registered_model(gate.registered_model)
        except Exception:
            client.create_registered_model(gate.registered_model, description="unCLIP bundles (clip, prior, decoder, "
                                                                          "upsamplers) with their evaluation")
        old = champion_version(client, gate.registered_model, gate.alias)       # fails closed on registry errors
        promote, reasons, rows = judge_against(gate, evaluation, old, rules)
        tags = {"git_revision": tracking.git_revision(ws.root), "profile": cfg.profile,
                "report_run": report_run or "", "gate": "promoted" if promote else "candidate",
                "gate_reasons": "; ".join(reasons)[:4900]}
        version = client.create_model_version(gate.registered_model, source=source, run_id=run.info.run_id, tags=tags)
        compare_page = None
        if promote:
            move_alias(client, gate, old, version)
        elif report_run and old is not None and old.tags.get("report_run"):
            compare_page = compare_with(ws, client, gate, old, version, report_run)
        verdict = {"registered_model": gate.registered_model, "version": int(version.version),
                   "promoted": promote, "alias": gate.alias, "reasons": reasons, "rules": rows,
                   "previous_champion": int(old.version) if old is not None else None,
                   "champion": (int(version.version) if promote else int(old.version) if old is not None else None),
                   "compare_report": compare_page, "report_run": report_run, "rule_set": rules_key}
        mlflow.log_dict(verdict, "gate.json")
        tracking.log_metrics({"promoted": float(promote), "version": float(version.version)})
    return verdict


def log_bundle(cfg, ws: Workspace, parts: list[Path], ev_path: Path, report_run: Optional[str], client, run) -> str:
    """Log the bundle and its evaluation as an MLflow Model under the promote run; returns its source URI."""
    import mlflow
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        for part in parts:
            shutil.copytree(part, bundle / part.name)
        shutil.copy(ev_path, bundle / "evaluate.json")
        # saved, then logged as run artifacts: mlflow.pyfunc.log_model would also check the
        # input example by loading the bundle and sampling it, a whole cascade per registration
        model = mlflow_model.save(bundle, Path(tmp) / MODEL_ARTIFACT, metadata={
            "bundle": f"artifacts/{mlflow_model.ARTIFACT}", "git_revision": tracking.git_revision(ws.root),
            "profile": cfg.profile, "report_run": report_run or ""})
        shutil.copy(ev_path, model / "evaluate.json")          # where the gate reads a version's figures
        mlflow.log_artifacts(str(model), MODEL_ARTIFACT)
    return client.get_run(run.info.run_id).info.artifact_uri.rstrip("/") + "/" + MODEL_ARTIFACT


def judge_against(gate, evaluation: dict, old, rules) -> tuple[bool, list[str], list]:
    """The gate's verdict on ``evaluation`` against the champion version ``old`` (None: there is
    none). An unreadable champion evaluation fails closed, unless ``promote.replace_unreadable``."""
    unreadable = None
    try:
        old_eval = _evaluation_of(old) if old is not None else None
    except GateRegistryError as err:
        old_eval, unreadable = None, str(err)
    if unreadable is None:
        return decide(evaluation, old_eval, rules)
    promote, reasons, rows = decide(evaluation, None, rules)
    if gate.replace_unreadable:
        reasons = [f"{unreadable}: replaced (promote.replace_unreadable)"] if promote else reasons
    else:
        promote, reasons = False, [f"{unreadable}: the candidate is not promoted (set "
                                   f"promote.replace_unreadable: true to replace such a champion)"]
    return promote, reasons, rows


def move_alias(client, gate, old, version) -> None:
    """Move the alias to ``version``: compare-and-set, as another gate may have moved it since
    ``old`` was read (then ``version`` stays a candidate and GateRegistryError says so)."""
    now = champion_version(client, gate.registered_model, gate.alias)
    if (now.version if now is not None else None) != (old.version if old is not None else None):
        client.set_model_version_tag(gate.registered_model, version.version, "gate", "candidate")
        raise GateRegistryError(
            f"@{gate.alias} moved from version {old.version if old is not None else None} to "
            f"{now.version if now is not None else None} while this gate ran (another promote): version "
            f"{version.version} stays a candidate; run `unclip promote` again to compare with the new champion")
    client.set_registered_model_alias(gate.registered_model, gate.alias, version.version)


def compare_with(ws: Workspace, client, gate, old, version, report_run: str) -> str:
    """The comparison page of the champion's run and this one, tagged on ``version``; a missing
    snapshot gives a note instead (it must not hide the verdict)."""
    try:
        from . import report
        page = str(report.compare(ws, old.tags["report_run"], report_run))
        client.set_model_version_tag(gate.registered_model, version.version, "compare_report", page)
        return page
    except Exception as err:
        return f"(no comparison page: {err})"


def champion(cfg, ws: Workspace) -> Optional[dict]:
    """The champion: ``path`` (its bundle's directory, downloaded from the registry's artifact
    store; inside the MLflow Model, or the raw folder of an older version), ``registered_model``,
    ``version``, ``alias``, ``run_id``; None when the registry has no champion (or no registry
    is reachable)."""
    import mlflow
    uri = tracking.tracking_uri(cfg, ws.root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None                    # no store yet: do not create one just to look
    try:
        client = _client(cfg, ws)
        v = champion_version(client, cfg.promote.registered_model, cfg.promote.alias)
        if v is None:
            return None
        path = mlflow_model.bundle_in(Path(mlflow.artifacts.download_artifacts(artifact_uri=v.source)))
        return {"path": path, "registered_model": cfg.promote.registered_model, "version": int(v.version),
                "alias": cfg.promote.alias, "run_id": v.run_id}
    except Exception:
        return None


def champion_models(cfg, ws: Workspace) -> Optional[Path]:
    """The champion bundle's directory, or None (see ``champion``)."""
    found = champion(cfg, ws)
    return found["path"] if found else None


def describe(verdict: dict) -> str:
    v = verdict
    if v["promoted"]:
        return (f"version {v['version']} of {v['registered_model']} is now @{v['alias']} "
                f"({'; '.join(v['reasons'])})")
    holder = f"remains version {v['champion']}" if v["champion"] is not None else "stays unset"
    return (f"version {v['version']} stays a candidate, @{v['alias']} {holder}: "
            f"{'; '.join(v['reasons'])}" + (f"; comparison: {v['compare_report']}" if v.get("compare_report") else ""))

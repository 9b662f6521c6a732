"""`unclip`: the command line. Thin: every command calls one library function."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from . import config as config_mod
from .stages import StageError, registry, run_stage
from .workspace import Workspace

# Exit codes: 2 = bad configuration or input (do not retry); 1 = anything else.
EXIT_BAD_INPUT = 2


def _load(ctx) -> tuple[config_mod.Config, Workspace]:
    ws = Workspace.at(ctx.obj["workspace"])
    try:
        cfg = config_mod.load(ws.params, ctx.obj["profile"])
    except config_mod.ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    return cfg, ws


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", default=None, metavar="NAME",
              help=f"params.yaml profile (default: ${config_mod.PROFILE_ENV} or 'default').")
@click.option("--workspace", "-w", default=None, metavar="DIR",
              help="Workspace holding params.yaml and dvc.yaml (default: $UNCLIP_WORKSPACE or cwd).")
@click.pass_context
def main(ctx, profile, workspace):
    """unCLIP pipeline: build a DALL-E 2 style text-to-image system from image-caption pairs."""
    ctx.ensure_object(dict)
    if profile:
        # Exported so DVC and every stage subprocess resolve the same profile.
        os.environ[config_mod.PROFILE_ENV] = profile
    ctx.obj.update(profile=profile, workspace=workspace)


@main.command()
@click.argument("name", metavar="NAME")
@click.pass_context
def stage(ctx, name):
    """Run one stage now (what `dvc repro <name>` calls): corpus, crawl, filter, judge, clip, embed,
    prior, decoder, upsample@<key> per upsampler of params.yaml's upsample.stages, evaluate.

    Exits 2 with the message on a failure that a retry would meet again (bad input, config,
    data or model, a non-finite loss, an unreadable file, a busy workspace: see
    ``stages.permanent_errors``), 1 with a traceback on anything else; either way the outcome is
    recorded in ``.unclip/exit/<stage>.json`` for the flow (``stages.write_exit``)."""
    from .lock import workspace_lock
    from .stages import permanent_errors, write_exit
    ws = Workspace.at(ctx.obj["workspace"])
    try:
        cfg, ws = _load(ctx)
        if name not in registry(cfg):
            raise StageError(f"unknown stage {name!r} (known: {', '.join(registry(cfg))})")
        os.chdir(ws.root)
        from . import launch
        if launch.relaunches(cfg, name):
            # cluster.train.launcher torchrun: this node's share of the job; node 0 holds the
            # workspace lock (every node runs this command, in a workspace they may share)
            lock = (workspace_lock(ws.root, f"unclip stage {name}") if launch.node_rank(cfg) == 0
                    else contextlib.nullcontext())
            with lock:
                if launch.node_rank(cfg) == 0:
                    config_mod.write_resolved(cfg, ws.root)     # what DVC records as this stage's params
                launch.launch(cfg, ws, name)
        else:
            with workspace_lock(ws.root, f"unclip stage {name}"):
                config_mod.write_resolved(cfg, ws.root)     # what DVC records as this stage's params
                run_stage(name, cfg, ws)
    except permanent_errors() as err:
        plain = isinstance(err, (StageError, config_mod.ConfigError))
        message = f"[{name}] {'' if plain else type(err).__name__ + ': '}{err}"
        click.echo(f"error: {message}", err=True)
        write_exit(ws, name, EXIT_BAD_INPUT, message)
        sys.exit(EXIT_BAD_INPUT)
    except SystemExit as err:                   # _load: a bad params.yaml
        write_exit(ws, name, err.code if isinstance(err.code, int) else 1, "bad configuration")
        raise
    except BaseException as err:
        write_exit(ws, name, 1, f"{type(err).__name__}: {err}")
        raise
    write_exit(ws, name, 0)


@main.command("config")
@click.option("--write", is_flag=True,
              help=f"Write it to the workspace's {config_mod.RESOLVED} instead (only if it changed): what "
                   "DVC sees as the stages' params (dvc.yaml's `config` stage).")
@click.pass_context
def show_config(ctx, write):
    """Validate params.yaml and print the resolved configuration of the active profile."""
    cfg, ws = _load(ctx)
    if not write:
        click.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return
    changed = config_mod.write_resolved(cfg, ws.root)
    click.echo(f"{config_mod.RESOLVED} (profile {cfg.profile}): {'written' if changed else 'unchanged'}")
    _report_store_changes(ws)      # dvc repro's first stage: what DVC cannot see, before it decides


def _report_store_changes(ws) -> dict:
    """storage.check_workspace, said: outputs whose objects changed in cluster.storage."""
    from . import storage
    found = storage.check_workspace(ws)
    for folder, problems in found.items():
        click.echo(f"{folder}: {len(problems)} object(s) under cluster.storage no longer match its "
                   f"{storage.MANIFEST} (e.g. {problems[0]}); marked with {storage.CHANGED}: its stage reruns")
    return found


@main.group("storage")
def storage_group():
    """Outputs held under cluster.storage (pipeline/storage.py)."""


@storage_group.command("check")
@click.pass_context
def storage_check(ctx):
    """Compare every data output's MANIFEST.json with the store; mark the changed ones stale for
    DVC (exit 1 when any changed)."""
    _, ws = _load(ctx)
    if _report_store_changes(ws):
        sys.exit(1)
    click.echo("every manifest matches the store (or no output is held there)")


@main.command()
@click.option("--force", is_flag=True, help="Rerun every stage even if DVC finds it up to date.")
@click.pass_context
def run(ctx, force):
    """Run the whole pipeline as a Prefect flow (stages through DVC, tracked in MLflow)."""
    cfg, ws = _load(ctx)
    # Offline machines: Prefect's server would otherwise log a failed telemetry call per run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.train import StageFailed, train_flow
    try:
        train_flow(workspace=str(ws.root), profile=cfg.profile, force=force)
    except StageFailed as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT if err.permanent else 1)


@main.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--n", "n", default=4, show_default=True, help="Images per prompt.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="The grid (one row per prompt); with --stages also <out>.stage<k>.png per stage. "
                   "[default: grid.png, none with --out-dir]")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False),
              help="Also one PNG per image, prompt<i>_seed<s>.png, and manifest.json (captions, seeds, sampling "
                   "settings, model version). Each image is sampled alone from its own seed (image k of a "
                   "prompt: --seed + k), as the served model samples it: the same bytes for the same seed.")
@click.option("--models", default=None, metavar="DIR|champion|workspace",
              help="A trained bundle (clip/ prior/ decoder/ upsampler_*/), `champion` (the registry's) or "
                   "`workspace` (models/); default: the champion when one is registered, else models/.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpm++"]), default=None, help="Decoder sampler.")
@click.option("--steps", type=int, default=None, help="Decoder sampling steps.")
@click.option("--guidance", type=float, default=None, help="Decoder guidance scale.")
@click.option("--prior-sampler", type=click.Choice(["ddpm", "ddim", "dpm++"]), default=None)
@click.option("--prior-steps", type=int, default=None)
@click.option("--prior-guidance", type=float, default=None)
@click.option("--upsampler-steps", type=int, default=None)
@click.option("--stages", "save_stages", is_flag=True, help="Also save the grid after every stage.")
@click.pass_context
def generate(ctx, prompts, n, seed, out, out_dir, models, sampler, steps, guidance, prior_sampler, prior_steps,
             prior_guidance, upsampler_steps, save_stages):
    """Text to image: PROMPTS through CLIP, the prior, the decoder and the upsamplers."""
    from .generate import save_grid
    from .seeded import Prompt, generate_each, sampling, save_images
    if n < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    root, identity = _models(ctx, models)
    unclip = _load_bundle(root)
    settings = dict(sampler=sampler, steps=steps, guidance=guidance, prior_sampler=prior_sampler,
                    prior_steps=prior_steps, prior_guidance=prior_guidance, upsampler_steps=upsampler_steps)
    try:
        if out_dir:                    # image by image, each from its own seed (what the server does)
            result = generate_each(unclip, [Prompt(p, seed=seed, n=n, settings=settings) for p in prompts])
        else:                          # one batch from one generator
            result = unclip.generate(list(prompts), n=n, seed=seed, **settings)
    except ValueError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    written = []
    if out or not out_dir:
        path = save_grid(result, n, Path(out or "grid.png"))
        written.append(str(path))
        if save_stages:
            for k in range(len(result["stages"]) - 1):
                save_grid(result, n, path.with_suffix(f".stage{k}.png"), stage=k)
    if out_dir:
        written.append(str(save_images(result, Path(out_dir), sampling=sampling(unclip, **settings), model=identity)))
    h = result["images"].shape[-1]
    click.echo(f"{len(result['captions'])} images at {h} px in {result['seconds']} s "
               f"(network evaluations per image: {result['nfe']}) -> {', '.join(written)}")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--caption", "captions", multiple=True,
              help="Score against this caption (repeat: one per grid row or one per image).")
@click.option("--tile", type=int, default=None, help="PATH is a grid of TILE px images (with --cols).")
@click.option("--cols", type=int, default=None, help="Images per grid row (for --tile).")
@click.option("--pad", type=int, default=2, show_default=True, help="Grid padding in px.")
@click.option("--judge", "judge_dir", default=None, type=click.Path(file_okay=False),
              help="A trained judge's directory (default: the workspace's models/judge).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.pass_context
def judge(ctx, path, captions, tile, cols, pad, judge_dir, as_json):
    """Read colors, shapes, sizes, positions and relations off images (a directory, an image,
    or a grid) with the ground-truth judge; with --caption, score them."""
    from .judge.files import judge_files
    from .judge.model import Judge
    try:
        j = Judge.load(Path(judge_dir) if judge_dir else Workspace.at(ctx.obj["workspace"]).judge)
        result = judge_files(j, Path(path), captions, tile, cols, pad)
    except (FileNotFoundError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    for entry in result["images"]:
        sees = entry["sees"]
        objs = f" {sees['relation']} ".join(" ".join(o[k] for k in ("size", "color", "shape", "position") if k in o)
                                            for o in sees["objects"])
        verdict = ""
        if "checks" in entry:
            wrong = [k for k, ok in entry["checks"].items() if not ok and k != "all"]
            verdict = "  ok" if not wrong else f"  wrong: {', '.join(wrong)}"
        click.echo(f"{entry['name']}: {objs} on {sees['background']}{verdict}")
    if "accuracy" in result:
        for kind, acc in result["accuracy"].items():
            if acc["n"]:
                click.echo(f"{kind} ({acc['n']}): " + ", ".join(f"{k} {v}%" for k, v in acc.items() if k != "n"))


# ---- the applications of the unCLIP latent ---------------------------------------------------------
def models_dir(ctx, models: str | None) -> Path:
    """--models: a directory, `workspace` (models/), `champion` (the registry's alias), or by default
    the champion when one is registered and the workspace's models/ otherwise."""
    return _models(ctx, models)[0]


def _models(ctx, models: str | None) -> tuple[Path, dict]:
    """models_dir, and where the bundle came from: the registry's name, version and alias, or a path."""
    ws = Workspace.at(ctx.obj["workspace"])
    if models not in (None, "champion", "workspace"):
        return Path(models), {"path": str(Path(models).resolve())}
    if models != "workspace" and (ws.params.exists() or models == "champion"):
        from .registry import champion
        cfg, _ = _load(ctx)
        found = champion(cfg, ws)
        if found is not None:
            click.echo(f"[models] {cfg.promote.registered_model}@{cfg.promote.alias} ({found['path']})", err=True)
            return found["path"], {k: (str(v) if k == "path" else v) for k, v in found.items()}
        if models == "champion":
            click.echo(f"error: no {cfg.promote.registered_model}@{cfg.promote.alias} in the model registry "
                       f"(run the pipeline, or pass --models DIR)", err=True)
            sys.exit(EXIT_BAD_INPUT)
    return ws.root / "models", {"path": str((ws.root / "models").resolve())}


def _bundle(ctx, models):
    return _load_bundle(models_dir(ctx, models))


def _load_bundle(root: Path):
    from .generate import Unclip
    try:
        return Unclip.load(root)
    except (FileNotFoundError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def _app_options(fn):
    fn = click.option("--models", default=None, metavar="DIR|champion|workspace",
                      help="A trained bundle; default: the registry's champion, else the workspace's models/.")(fn)
    fn = click.option("--seed", default=0, show_default=True)(fn)
    fn = click.option("--steps", default=100, show_default=True,
                      help="DDIM steps of the decoder's inversion and sampling.")(fn)
    return fn


def _run_app(fn):
    """Bad input (an unreadable image, a bad mask) exits 2 with the reason."""
    try:
        return fn()
    except (FileNotFoundError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--n", "n", default=4, show_default=True, help="Variations per eta.")
@click.option("--etas", default="0,0.25,0.5,1", show_default=True, help="DDIM eta values (0: the reconstruction).")
@click.option("--out", default="variations.png", show_default=True, type=click.Path(dir_okay=False))
@_app_options
@click.pass_context
def vary(ctx, image, n, etas, out, models, seed, steps):
    """Variations of IMAGE: its bipartite latent (CLIP z_i, DDIM-inverted noise) decoded at every eta,
    and z_i from fresh noise. Prints the reconstruction's PSNR at the decoder's resolution."""
    from .applications import files, vary as vary_fn

    def go():
        img = files.load_image(image)                  # bad input fails before the models load
        unclip = _bundle(ctx, models)
        res = vary_fn(unclip, img, seed=seed, etas=_floats(etas, "--etas"), n=n, steps=steps)
        rows = [("input | reconstruction", files.join([img, res["reconstruction"]]))]
        rows += [(f"eta {eta:g}", x) for eta, x in res["by_eta"].items()] + [("fresh noise", res["fresh"])]
        path = files.save_rows(rows, out)
        click.echo(f"reconstruction PSNR {res['psnr'].mean():.2f} dB at {unclip.sizes[0]} px; "
                   f"{n} variations per eta -> {path}")
    _run_app(go)


@main.command()
@click.argument("image_a", type=click.Path(dir_okay=False))
@click.argument("image_b", type=click.Path(dir_okay=False))
@click.option("--frames", default=8, show_default=True)
@click.option("--noise", type=click.Choice(["inverted", "shared"]), default="inverted", show_default=True,
              help="Decoder noise: the two images' inverted noises slerped, or one fresh noise for all frames.")
@click.option("--out", default="interpolation.gif", show_default=True, type=click.Path(dir_okay=False),
              help="The GIF; a strip <out>.png beside it.")
@_app_options
@click.pass_context
def interpolate(ctx, image_a, image_b, frames, noise, out, models, seed, steps):
    """Interpolate between two images: their CLIP image embeddings slerped, the decoder noise held fixed."""
    from .applications import files, interpolate as interp_fn

    def go():
        if frames < 2:
            raise ValueError("--frames must be at least 2")
        a, b = files.load_image(image_a), files.load_image(image_b)
        res = interp_fn(_bundle(ctx, models), a, b, frames=frames, seed=seed, noise=noise, steps=steps)
        gif = files.save_gif(res["frames"], out)
        strip = files.save_rows([(f"{Path(image_a).name} -> {Path(image_b).name}", res["frames"])],
                                Path(out).with_suffix(".png"))
        click.echo(f"{frames} frames -> {gif} and {strip}")
    _run_app(go)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--from", "before", required=True, help="A caption of the image as it is (e.g. 'a red circle').")
@click.option("--to", "after", required=True, help="The caption to move toward (e.g. 'a blue circle').")
@click.option("--thetas", default="0,0.1,0.2,0.3,0.4,0.5", show_default=True,
              help="Rotation toward the text diff (0: the reconstruction).")
@click.option("--caption", "decoder_caption", type=click.Choice(["none", "after", "before_after"]), default="none",
              show_default=True, help="The decoder's text condition: none (z_theta alone, the paper's text diff), "
              "the --to caption, or before_after (inverted under --from, decoded under --to).")
@click.option("--guidance", default=1.0, show_default=True, type=float,
              help="Classifier-free guidance of the decoder (with --caption after: toward z_theta and the caption).")
@click.option("--out", default="textdiff.png", show_default=True, type=click.Path(dir_okay=False))
@_app_options
@click.pass_context
def textdiff(ctx, image, before, after, thetas, decoder_caption, guidance, out, models, seed, steps):
    """Edit IMAGE with a text diff: its z_i rotated toward normalize(z_t(--to) - z_t(--from)) by each theta."""
    from .applications import files, textdiff as textdiff_fn

    def go():
        img, ts = files.load_image(image), _floats(thetas, "--thetas")
        res = textdiff_fn(_bundle(ctx, models), img, [before], [after], thetas=ts, seed=seed, steps=steps,
                          caption=decoder_caption, guidance=guidance)
        path = files.save_rows([(f"theta {t:g}", x) for t, x in res["by_theta"].items()], out)
        click.echo(f"'{before}' -> '{after}' at theta {thetas} -> {path}")
    _run_app(go)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--caption", required=True, help="What the repainted image should show.")
@click.option("--mask", "mask_path", default=None, type=click.Path(dir_okay=False),
              help="A mask image: white = repaint, black = keep.")
@click.option("--box", default=None, help="Or the region to repaint as x0,y0,x1,y1 in fractions of the image.")
@click.option("--n", "n", default=4, show_default=True, help="Samples, all drawn from one generator seeded with --seed.")
@click.option("--out", default="inpaint.png", show_default=True, type=click.Path(dir_okay=False))
@_app_options
@click.pass_context
def inpaint(ctx, image, caption, mask_path, box, n, out, models, seed, steps):
    """Repaint the masked region of IMAGE to show CAPTION; everything outside the mask is kept exactly."""
    from .applications import files, inpaint as inpaint_fn

    def go():
        img = files.load_image(image)
        mask = files.load_mask(mask_path, box, img.shape[-2], img.shape[-1])
        res = inpaint_fn(_bundle(ctx, models), img.expand(n, -1, -1, -1), mask.expand(n, -1, -1, -1), [caption] * n, seed=seed,
                         steps=steps)
        shown = (img.float() * (1 - 0.6 * mask)).round().to(img.dtype)          # the masked region darkened
        path = files.save_rows([("input | mask", files.join([img, shown])), (caption, res["images"])], out)
        click.echo(f"{n} inpaintings of {int(mask.sum())} masked pixels -> {path}")
    _run_app(go)


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1)
@click.option("--new", "snapshot_now", is_flag=True,
              help="Snapshot the workspace's current evaluation as a new run first (normally evaluate does it).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="compare: where to write the page.")
@click.pass_context
def report(ctx, args, snapshot_now, out):
    """Evaluation reports: `report [RUN]` (re)builds reports/RUN/report.html (default: latest);
    `report compare A B` writes A and B side by side; `report list` lists the runs.

    RUN is a run name, a unique prefix of one, `latest` or `previous`."""
    from . import report as rep
    cfg, ws = _load(ctx)
    try:
        if args[:1] == ("list",):
            for run_dir in rep.runs(ws):
                click.echo(run_dir.name)
            return
        if args[:1] == ("compare",):
            if len(args) != 3:
                raise click.UsageError("usage: unclip report compare RUN_A RUN_B")
            click.echo(rep.compare(ws, args[1], args[2], out))
            return
        if len(args) > 1:
            raise click.UsageError("usage: unclip report [RUN] | compare RUN_A RUN_B | list")
        if snapshot_now:
            from .report.snapshot import snapshot
            run_dir = snapshot(cfg, ws)
            click.echo(rep.build(ws, run_dir))
            return
        click.echo(rep.build(ws, args[0] if args else "latest"))
    except rep.ReportError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)


@main.command()
@click.pass_context
def promote(ctx):
    """Register the workspace's evaluated bundle in MLflow's model registry and run the gate
    (the flow does this after every evaluate)."""
    from . import registry
    from .lock import WorkspaceBusy, workspace_lock
    cfg, ws = _load(ctx)
    try:
        # one promote at a time, and none while a stage may be renaming models/ (registry.py copies it)
        with workspace_lock(ws.root, "unclip promote"):
            verdict = registry.register_and_gate(cfg, ws)
    except (registry.GateError, WorkspaceBusy) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(registry.describe(verdict))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
def init(directory):
    """Create a workspace: a git + DVC repo holding params.yaml and dvc.yaml."""
    from .workspace import init_workspace
    root = init_workspace(directory)
    click.echo(f"workspace ready at {root}")


if __name__ == "__main__":
    main()

"""DALL-E 2's comparison of its two priors on this corpus: train the other kind beside the
workspace's prior, then feed both through the same cascade, captions and seeds.

    python bench/prior_comparison.py [--workspace .] [--kind autoregressive] [--name prior_autoregressive] \
        [--set autoregressive.components=32 --set steps=1200] [--load DIR] [--n 256] [--profile default] [--out FILE]

The other prior trains with the prior stage's own recipe (``prior.stage.train``: the workspace's
embeddings, its training loop, checkpoints under ``.unclip/checkpoints/<name>``) into
``models/<name>`` (``--load``: measure a trained bundle instead). ``--set key=json`` overrides keys
of the ``prior`` section for it. Then ``pipeline.prior_comparison`` runs both priors on ``--n``
one-object and ``--n`` two-object held-out test captions, exactly as ``evaluate`` does with
``evaluate.compare_priors: {<name>: models/<name>}``, and prints the table (written to ``--out``). The workspace's own models, metrics and DVC state are untouched.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config, prior_comparison  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.evaluate import compare_priors, pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.prior import stage as prior_stage  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--kind", default="autoregressive", choices=("autoregressive", "diffusion"))
    ap.add_argument("--name", default=None, help="models/<name> (default: prior_<kind>)")
    ap.add_argument("--set", action="append", default=[], help="prior.<key>=<json value> for it, repeatable")
    ap.add_argument("--load", default=None, help="compare this trained prior bundle instead of training one")
    ap.add_argument("--n", type=int, default=256, help="one-object and two-object test captions each")
    ap.add_argument("--out", default=None, help="the figures' JSON (default: <workspace>/reports/prior_comparison.json)")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    cfg = config.load(ws.root / "params.yaml", args.profile)
    name = args.name or f"prior_{args.kind}"
    try:
        p = config.with_overrides(cfg.prior, [f"kind={json.dumps(args.kind)}", *args.set], "prior")
    except ValueError as err:
        sys.exit(str(err))
    figures = {"name": name, "prior": p.model_dump(mode="json")}
    if args.load:
        bundle_dir = Path(args.load)
    else:
        bundle_dir = ws.root / "models" / name
        figures["train"] = prior_stage.train(cfg.model_copy(update={"prior": p}), ws, bundle_dir,
                                             ws.checkpoints / name)
    e = cfg.evaluate.model_copy(update={"n_single": args.n, "n_pair": args.n,
                                        "compare_priors": {name: str(bundle_dir.resolve())}})
    unclip = Unclip.load(ws.root / "models")
    test = load_split(shard_paths(ws.embeddings), "test", image_size=unclip.sizes[-1])
    rows = pick_rows(test["gt"], e.n_single, e.n_pair)
    held = {"rows": rows, "captions": [test["captions"][i] for i in rows]}
    # evaluate's own comparison (what evaluate.compare_priors runs), on these captions
    figures["comparison"] = compare_priors(e, ws, unclip, Judge.load(ws.judge, unclip.device), test, held)
    figures["n_captions"] = len(rows)
    out = Path(args.out) if args.out else ws.reports / "prior_comparison.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, figures)
    print("\n".join(prior_comparison.table(figures["comparison"])))
    print(f"-> {out}")


if __name__ == "__main__":
    main()

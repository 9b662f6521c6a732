"""Train a decoder variant from scratch (or load one) and judge what it draws from true z_i.

    python bench/decoder_variant.py --name b16 --set batch_size=16 --set steps=4200 \
        [--workspace .] [--n 128] [--samplers dpm++:12:2,ddpm:12:2] [--load models/decoder] [--init-seed S]
        [--init-part unet.up_blocks,unet.conv_out=0] [--init-weights other.pt]

The quick loop for decoder experiments: ``--set key=json`` overrides keys of the ``decoder``
section (``--set image_size=32 --set 'block_out_channels=[16,32,64,128]'``), the variant trains
with the stage's own recipe (``train_diffusion_model``, checkpoints under ``--out``) and then
decodes ``--n`` one-object and ``--n`` two-object held-out test captions from their own image
embeddings and captions (the decoder alone: no prior, no upsamplers) once per sampler spec
``sampler:steps:guidance``, with one seed. The judge scores each set; printed per spec: one-object
color / shape / size / position, two-object both colors / relation, the Frechet distance in the
judge's features to the same real test images, and for the last spec the one-object shapes the
judge read, by true shape and size (where shapes are lost); and the background's pixel noise
(``pipeline.background``) of the output taken bicubically to 64 px. Writes ``<out>/<name>.json``, a grid
of the first 32 images per spec, and the variant's EMA weights (``<name>.pt``).

Nothing here touches the workspace's models, metrics or DVC state.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import background, bundle, config  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.decoder.network import UnclipDecoder  # noqa: E402
from pipeline.decoder.diffusion import Condition, DecoderSampling  # noqa: E402
from pipeline.decoder.stage import arch_of, decode, sampling_info, training_fns  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.images import grid, resize, save_png, to_uint8  # noqa: E402
from pipeline.judge.labels import VOCAB, parse_gt  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.quality import score  # noqa: E402
from pipeline.training import train_diffusion_model  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402


def initialise(arch: dict, parts: list[str]) -> tuple[UnclipDecoder, dict]:
    """A decoder drawn from the global generator's state, then each ``"PREFIX[,PREFIX...]=S"`` of ``parts``:
    the tensors whose names start with one of the prefixes replaced by their draw from seed S (a whole model drawn
    from S, so a tensor's values are those it has in seed S's model). Returns the model and what was replaced."""
    model = UnclipDecoder(**arch)
    replaced = {}
    rng = torch.random.get_rng_state()              # the donors' draws must not move the caller's generator
    for part in parts:
        prefixes, seed = part.rsplit("=", 1)
        torch.manual_seed(int(seed))
        donor = UnclipDecoder(**arch).state_dict()
        own = model.state_dict()
        taken = [k for k in own if k.startswith(tuple(prefixes.split(",")))]
        if not taken:
            raise ValueError(f"--init-part {part}: no parameter name starts with {prefixes}")
        model.load_state_dict(own | {k: donor[k] for k in taken})
        replaced[prefixes] = {"seed": int(seed), "tensors": len(taken),
                              "parameters": sum(donor[k].numel() for k in taken)}
    torch.random.set_rng_state(rng)
    return model, replaced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", action="append", default=[], help="decoder.<key>=<json value>, repeatable")
    ap.add_argument("--init-seed", type=int, default=None,
                    help="initialise the network from this seed, then reseed with decoder.seed for the training's "
                         "noise and data order (separates the two; default: decoder.seed for both, as the stage)")
    ap.add_argument("--init-part", action="append", default=[], metavar="PREFIX[,PREFIX...]=S",
                    help="the parameters whose names start with one of the prefixes initialised from seed S's draw "
                         "instead (repeatable): which layers of an initialisation carry what it draws")
    ap.add_argument("--init-weights", default=None, metavar="PT",
                    help="start the training from these weights (a .pt of this script; a fresh optimizer and lr "
                         "schedule: a warm restart) instead of an initialisation")
    ap.add_argument("--load", default=None, help="judge this decoder bundle (or .pt of this script) instead of training")
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/decoder_variants")
    ap.add_argument("--n", type=int, default=128, help="one-object and two-object test captions each")
    ap.add_argument("--samplers", default="dpm++:12:2,ddpm:12:2", help="sampler:steps:guidance, comma-separated")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    cfg = config.load(ws.root / "params.yaml")
    try:                                                # the section's own validation of the overrides
        d = config.with_overrides(cfg.decoder, args.set, "decoder")
    except ValueError as err:
        sys.exit(str(err))
    out_dir = Path(args.out) if args.out else ws.reports / "decoder_variants"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(ws.embeddings)
    if not paths:
        sys.exit(f"no embedding shards in {ws.embeddings}: run the embed stage first")
    test = load_split(paths, "test", image_size=d.image_size)
    figures: dict = {"name": args.name, "decoder": d.model_dump(mode="json")}

    if args.load and not args.load.endswith(".pt"):
        model, _ = bundle.load_model(Path(args.load), "decoder", UnclipDecoder)
    else:
        init_seed = d.seed if args.init_seed is None else args.init_seed
        torch.manual_seed(init_seed)
        try:
            model, parts = initialise(arch_of(d, test["z_i"].shape[1], test["tokens"].shape[2]), args.init_part)
        except ValueError as err:
            sys.exit(str(err))
        if parts:
            figures["init_parts"] = parts
        if args.init_seed is not None or args.init_part:
            torch.manual_seed(d.seed)       # the noise, timesteps and drops; the data order is decoder.seed's anyway
            figures["init_seed"] = init_seed
        if args.init_weights:
            model.load_state_dict(torch.load(args.init_weights))
            figures["init_weights"] = args.init_weights
        if args.load:
            model.load_state_dict(torch.load(args.load))
        else:
            make_batches, loss_fn = training_fns(d, paths, 1 + cfg.embed.rewrites)
            summary, _ = train_diffusion_model(model, d, make_batches, loss_fn,
                                               checkpoint_dir=out_dir / "checkpoints" / args.name,
                                               key={"variant": args.name, "decoder": figures["decoder"]},
                                               desc=f"{args.name}: train")
            figures["train"] = summary
            torch.save(model.state_dict(), out_dir / f"{args.name}.pt")
        model.eval()

    judge = Judge.load(ws.judge)
    rows = torch.tensor(pick_rows(test["gt"], args.n, args.n))
    gts, captions = [test["gt"][i] for i in rows], [test["captions"][i] for i in rows]
    real = judge.predict(load_split(paths, "test", image_size=64)["images"][rows])[1]
    figures["samplers"] = {}
    for spec in args.samplers.split(","):
        sampler, steps, guidance = spec.split(":")
        sampling = DecoderSampling.of(sampling_info(d), sampler=sampler, steps=int(steps),
                                      guidance_scale=float(guidance))
        t0 = time.perf_counter()
        images = to_uint8(decode(model, Condition(test["z_i"][rows], test["tokens"][rows], test["mask"][rows]),
                                 sampling, seed=0, precision=d.precision))
        readings: list = []
        fig = score(judge, images, gts, real, preds=readings)
        # the background's pixel noise, the 16 px output taken bicubically to 64 px (real images so: ~0.3)
        fig["background"] = background.figures(to_uint8(resize(images.float() / 127.5 - 1, 64)), gts, captions)
        figures["samplers"][spec] = fig
        print(f"{args.name} {spec}: one object color {fig['single']['color']} shape {fig['single']['shape']} "
              f"size {fig['single']['size']} position {fig['single']['position']}; two objects colors "
              f"{fig['pair']['colors']} relation {fig['pair']['relation']}; FD {fig['frechet_distance']}; background noise "
              f"{fig['background']['noise']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        save_png(grid(images[:32], 8, scale=max(1, 64 // d.image_size)),
                 out_dir / f"{args.name}_{sampler}{steps}_g{guidance}.png")
    # where shapes are lost (the last spec): true (shape, size) -> the shape the judge read
    read = Counter()
    for p, g in zip(readings, gts):
        g = parse_gt(g)
        if len(g["objects"]) == 1:
            o = g["objects"][0]
            read[f"{o['size']} {o['shape']} -> {VOCAB['shape'][p['shape']]}"] += 1
    figures["shape_readings"] = dict(sorted(read.items()))
    for k, v in figures["shape_readings"].items():
        print(f"  {k}: {v}")
    atomic_write_json(out_dir / f"{args.name}.json", figures)


if __name__ == "__main__":
    main()

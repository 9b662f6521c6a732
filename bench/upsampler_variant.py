"""Train an upsampler variant (or load one) and measure what it does to the cascade's images.

    python bench/upsampler_variant.py --key 2 --name steps900 --set steps=900 \
        [--workspace .] [--n 128] [--load models/upsampler_2] [--with 1=DIR] [--save DIR]

The quick loop for upsampler experiments, as ``bench/decoder_variant.py`` is for the decoder.
``--set key=json`` overrides keys of ``upsample.stages.<key>``; the variant trains with the stage's
own recipe (``upsampler.stage.train``: its data, crops, corruption, loss and checkpoints under
``--out``), or ``--load`` takes a trained bundle (the baseline: the workspace's own). ``--save DIR`` keeps the
trained variant as a bundle, and ``--with KEY=DIR`` puts such a bundle in place of another
upsampler of the chain, so that variants of both can be measured together. Then, printed
and written to ``<out>/<name>.json``:

    val PSNR          the stage's own figure (val images, uncorrupted low-res input) and bicubic's
    real-input noise  the background's pixel noise (``pipeline.background``) when the input is a
                      real test image taken down to the upsampler's input size: what the network
                      adds to a clean image (real images: about 0.5 levels)
    cascade           the whole stack (prior, decoder, the workspace's other upsamplers, this
                      variant in its place) on ``--n`` one-object and ``--n`` two-object held-out
                      test captions, one seed, judged as ``evaluate`` judges, with its
                      background noise and seconds per image

Nothing here touches the workspace's models, metrics or DVC state.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import background, bundle, config  # noqa: E402
from pipeline.data.image_shards import iter_split  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.images import grid, resize, save_png, to_model, to_uint8  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.quality import score  # noqa: E402
from pipeline.device import autocast, use_bf16  # noqa: E402
from pipeline.diffusion import in_batches  # noqa: E402
from pipeline.upsampler import diffusion as up_diffusion  # noqa: E402
from pipeline.upsampler.stage import (model_info, chain_sizes, conditioned, evaluate, image_embedding,  # noqa: E402
                                      source_dir, train)
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", default="2", help="which upsampler of upsample.stages")
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", action="append", default=[], help="upsample.stages.<key>.<k>=<json value>, repeatable")
    ap.add_argument("--load", default=None, help="measure this upsampler bundle instead of training one")
    ap.add_argument("--with", dest="others", action="append", default=[], metavar="KEY=DIR",
                    help="another upsampler bundle in place of the workspace's upsampler KEY, repeatable")
    ap.add_argument("--save", default=None, help="write the trained variant as an upsampler bundle here")
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/upsampler_variants")
    ap.add_argument("--n", type=int, default=128, help="one-object and two-object test captions each")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    cfg = config.load(ws.root / "params.yaml")
    if args.key not in cfg.upsample.stages:
        sys.exit(f"no upsampler {args.key!r} in upsample.stages (known: {', '.join(cfg.upsample.stages)})")
    try:
        u = config.with_overrides(cfg.upsample.stages[args.key], args.set, f"upsample.stages.{args.key}")
    except ValueError as err:
        sys.exit(str(err))
    in_size, out_size = chain_sizes(cfg)[args.key]
    out_dir = Path(args.out) if args.out else ws.reports / "upsampler_variants"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(source_dir(ws, u))
    if not paths:
        sys.exit(f"no shards in {source_dir(ws, u)}: run the data stages first")
    figures: dict = {"name": args.name, "key": args.key, "stage": u.model_dump(mode="json")}

    if args.load:
        model, meta = up_diffusion.load(Path(args.load))
        info = meta["info"]
    else:
        embed_dim = image_embedding(next(iter_split(paths[:1], None))).shape[0] if conditioned(u) else 0
        t0 = time.perf_counter()
        model, arch, summary, _, _ = train(u, args.key, paths, in_size, out_size,
                                           out_dir / "checkpoints" / args.name, embed_dim=embed_dim)
        figures["train"] = summary | {"wall_s": round(time.perf_counter() - t0, 1)}
        model.eval()
        info = model_info(u, args.key, in_size, out_size, summary["crop_size"])
        if args.save:
            bundle.save_model(Path(args.save), model, kind="upsampler", arch=arch, run_config=bundle.run_config(cfg),
                              info=info)
    with torch.no_grad():
        figures["val"], rows = evaluate(model, info, paths, u.seed)
    save_png(grid(rows, nrow=len(rows) // 3, scale=max(1, 128 // out_size)), out_dir / f"{args.name}_val.png")
    print(f"{args.name}: val PSNR {figures['val']['psnr_db']} dB (bicubic {figures['val']['bicubic_psnr_db']})",
          flush=True)

    unclip = Unclip.load(ws.root / "models")
    bf16 = use_bf16("auto", unclip.device)
    keys = [m["info"]["key"] for _, m in unclip.upsamplers]
    for key, directory in (o.split("=", 1) for o in args.others):
        if key not in keys:
            sys.exit(f"--with {key}=...: no upsampler {key!r} in the chain (known: {', '.join(keys)})")
        other, meta = up_diffusion.load(Path(directory))
        unclip.upsamplers[keys.index(key)] = (up_diffusion.for_sampling(other, bf16), meta)
        figures.setdefault("with", {})[key] = directory
    fast = up_diffusion.for_sampling(model, bf16)
    unclip.upsamplers[keys.index(args.key)] = (fast, {"info": info})
    test = load_split(shard_paths(ws.embeddings), "test", image_size=64)
    rows = pick_rows(test["gt"], args.n, args.n)
    captions, gts = [test["captions"][i] for i in rows], [test["gt"][i] for i in rows]
    real = test["images"][torch.tensor(rows)]
    real_noise = background.figures(real, gts, captions, real=True)["noise"]

    # what the network adds to a clean input: real images taken down to its input size
    with torch.no_grad(), autocast("auto", unclip.device):
        low = resize(to_model(real), in_size)
        up = in_batches(up_diffusion.sample, fast, up_diffusion.Condition(low, test["z_i"][torch.tensor(rows)]),
                        up_diffusion.UpsamplerSampling.of(info), 32, generator=torch.Generator().manual_seed(0))
    noise = lambda x: background.figures(to_uint8(resize(x, 64)), gts, captions, real_noise=real_noise)["noise"]  # noqa: E731
    figures["real_input_noise"] = {"upsampler": round(noise(up), 2), "bicubic": round(noise(resize(low, out_size)), 2),
                                   "real": round(real_noise, 2)}
    print(f"{args.name}: background noise from real {in_size} px input: {figures['real_input_noise']}", flush=True)

    judge = Judge.load(ws.judge)
    _, real_preds = judge.predict(real)
    t0 = time.perf_counter()
    out = unclip.generate(captions, n=1, seed=0, batch_size=32)
    seconds = (time.perf_counter() - t0) / len(captions)
    fig = score(judge, out["images"], gts, real_preds)
    bg = background.figures(out["images"], gts, captions, real_noise=real_noise)
    figures["cascade"] = fig | {"background": bg, "s_per_image": round(seconds, 4), "nfe": out["nfe"]}
    print(f"{args.name}: cascade one object color {fig['single']['color']} shape {fig['single']['shape']} size "
          f"{fig['single']['size']} position {fig['single']['position']}; two objects colors {fig['pair']['colors']} "
          f"relation {fig['pair']['relation']}; FD {fig['frechet_distance']}; background noise {bg['noise']:.2f} "
          f"(real {real_noise:.2f}); {seconds:.4f} s/image", flush=True)
    save_png(grid(out["images"][:32], 8), out_dir / f"{args.name}_cascade.png")
    atomic_write_json(out_dir / f"{args.name}.json", figures)


if __name__ == "__main__":
    main()

"""Our decoder and prior against DALLE2-pytorch's at matched size: training throughput and sampling time.

    bash bench/dalle2_pytorch/setup.sh                     # once: DALLE2-pytorch's own venv
    python bench/dalle2_pytorch/compare.py [--repeats 3] [--threads 2] [--quick]

Runs with either Python (it only starts subprocesses). It reads our default decoder and prior
from params.yaml (ours.py, the project's venv), sizes DALLE2-pytorch's to the same parameter
count (its ``Unet`` base width and resnet blocks per level, its prior network's depth and
feed-forward width; within ``--tolerance``, preferring our level widths / depth), at the same
resolution, embedding/token shapes, batch, precision and torch thread count, and the same
network evaluations per sample when sampling. Then ``--repeats`` rounds, each one process of
ours and one of theirs (the order alternating between rounds: the machine is shared and noisy),
each training both models for ``--steps`` timed steps after ``--warmup`` and sampling once.

Printed and written (``--out``, default reports/bench/dalle2_compare.json): the medians of
training items/s (images for the decoder, embeddings for the prior) and sampling s/item, the
ratios ours/theirs of the medians and the median of each round's own ratio, and the issue's bar:
ours >= 1.5x DALLE2-pytorch's training throughput for both models.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BAR = 1.5


def call(python: str, script: str, job: dict, threads: int) -> dict:
    """Run ``script`` with ``python`` on the job; its last stdout line, parsed."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                        "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, str(HERE / script), json.dumps(job)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decoder_candidates(arch: dict) -> list[dict]:
    """DALLE2-pytorch U-Nets with our levels (width multipliers, attention at the same levels,
    32-wide heads): base width and resnet blocks per level vary."""
    widths = arch["block_out_channels"]
    mults = [w // widths[0] for w in widths]
    return [{"dim": dim, "dim_mults": mults, "num_resnet_blocks": blocks, "self_attn": arch["attention"],
             "attn_dim_head": 32, "attn_heads": max(1, dim * mults[-1] // 32), "num_image_tokens": arch["extra_tokens"]}
            for dim in range(16, 97, 8) for blocks in (1, 2, 3)]


def prior_candidates(arch: dict) -> list[dict]:
    """DALLE2-pytorch prior networks of our width (it must equal the embedding) and heads:
    depth and feed-forward multiplier vary."""
    return [{"depth": depth, "heads": arch["heads"], "dim_head": arch["head_dim"], "ff_mult": ff}
            for depth in range(1, 9) for ff in (2, 3, 4)]


def pick(candidates: list[dict], counts: list[int], target: int, tolerance: float, same_shape) -> dict:
    """Within ``tolerance`` of ``target`` parameters: our shape first (``same_shape``), then the
    closest count; none within: the closest count, flagged."""
    rel = [c / target - 1 for c in counts]
    inside = [i for i, r in enumerate(rel) if abs(r) <= tolerance]
    pool = inside or range(len(candidates))
    best = min(pool, key=lambda i: (not same_shape(candidates[i]), abs(rel[i])) if inside else abs(rel[i]))
    return {"config": candidates[best], "params": counts[best], "relative": round(rel[best], 4),
            "within_tolerance": bool(inside)}


def median_of(rounds: list[dict], side: str, model: str, key: str) -> float:
    return statistics.median(r[side][model][key] for r in rounds)


def summarize(rounds: list[dict]) -> dict:
    out = {}
    for model in ("decoder", "prior"):
        m = {side: {k: median_of(rounds, side, model, k)
                    for k in ("train_items_per_s", "sample_s_per_item", "nfe_per_item")}
             for side in ("ours", "theirs")}
        m["train_ratio"] = m["ours"]["train_items_per_s"] / m["theirs"]["train_items_per_s"]
        m["train_ratio_paired"] = statistics.median(
            r["ours"][model]["train_items_per_s"] / r["theirs"][model]["train_items_per_s"] for r in rounds)
        m["sample_speedup"] = m["theirs"]["sample_s_per_item"] / m["ours"]["sample_s_per_item"]
        m["sample_speedup_paired"] = statistics.median(
            r["theirs"][model]["sample_s_per_item"] / r["ours"][model]["sample_s_per_item"] for r in rounds)
        m["meets_bar"] = m["train_ratio"] >= BAR
        out[model] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default 2; --quick: 1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps per run")
    ap.add_argument("--steps", type=int, default=12, help="timed training steps per run")
    ap.add_argument("--decoder-sample-batch", type=int, default=16)
    ap.add_argument("--prior-sample-batch", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto: what our stages use here (bf16 where the CPU has it natively); both sides get it")
    ap.add_argument("--tolerance", type=float, default=0.10, help="parameter count match, relative")
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 4/16, 1 repeat, 1+2 steps, 2 samples")
    ap.add_argument("--ours-python", default=str(ROOT / ".venv/bin/python"))
    ap.add_argument("--theirs-python", default=str(HERE / ".venv/bin/python"))
    ap.add_argument("--out", default=None, help="default reports/bench/dalle2_compare.json (--quick: ...quick.json)")
    args = ap.parse_args()
    if not Path(args.theirs_python).exists():
        sys.exit(f"{args.theirs_python} missing: run bash bench/dalle2_pytorch/setup.sh first")
    threads = args.threads or (1 if args.quick else 2)
    if args.quick:
        args.repeats, args.warmup, args.steps = 1, 1, 2
        args.decoder_sample_batch = args.prior_sample_batch = 2

    ours = call(args.ours_python, "ours.py", {"mode": "describe"}, threads)
    shapes, d, p = ours["shapes"], ours["decoder"], ours["prior"]
    precision = ours["precision"] if args.precision == "auto" else args.precision
    dc, pc = decoder_candidates(d["arch"]), prior_candidates(p["arch"])
    counts = call(args.theirs_python, "theirs.py", {"mode": "count", "shapes": shapes, "decoder": dc, "prior": pc}, threads)
    their_d = pick(dc, counts["decoder"], d["params"], args.tolerance,
                   lambda c: c["dim"] == d["arch"]["block_out_channels"][0])
    their_p = pick(pc, counts["prior"], p["params"], args.tolerance, lambda c: c["depth"] == p["arch"]["layers"])
    d_batch, p_batch = (4, 16) if args.quick else (d["batch"], p["batch"])
    print(f"decoder: ours {d['params']:,} params; DALLE2-pytorch Unet {their_d['config']} "
          f"{their_d['params']:,} ({their_d['relative']:+.1%}); {shapes['image_size']} px, batch {d_batch}")
    print(f"prior:   ours {p['params']:,} params; DALLE2-pytorch DiffusionPriorNetwork {their_p['config']} "
          f"{their_p['params']:,} ({their_p['relative']:+.1%}); batch {p_batch}")
    print(f"precision {precision}, {threads} torch thread(s), {args.repeats} round(s) of "
          f"{args.warmup}+{args.steps} training steps", flush=True)

    train = {"warmup": args.warmup, "steps": args.steps}
    ours_job = {"mode": "run", "threads": threads, "precision": precision,
                "decoder": {"batch": d_batch, "sample_batch": args.decoder_sample_batch, **train},
                "prior": {"batch": p_batch, "sample_batch": args.prior_sample_batch, **train}}
    recipe = ("lr", "weight_decay", "grad_clip", "warmup_steps", "ema_decay")
    theirs_job = {"mode": "run", "threads": threads, "precision": precision, "shapes": shapes,
                  "decoder": {"unet": their_d["config"], "batch": d_batch, **train, **{k: d[k] for k in recipe},
                              "p_drop_image": d["p_drop_image"], "p_drop_caption": d["p_drop_caption"],
                              "prediction": "v" if d["prediction_type"] == "v_prediction" else "eps",
                              "sample": {"steps": d["sampling"]["steps"], "guidance": d["sampling"]["guidance_scale"],
                                         "batch": args.decoder_sample_batch}},
                  "prior": {"net": their_p["config"], "batch": p_batch, **train, **{k: p[k] for k in recipe},
                            "p_uncond": p["p_uncond"],
                            "sample": {"steps": p["sampling"]["steps"], "guidance": p["sampling"]["guidance_scale"],
                                       "batch": args.prior_sample_batch, "candidates": p["n_candidates"]}}}
    rounds = []
    for r in range(args.repeats):
        order = [("ours", "ours.py", args.ours_python, ours_job), ("theirs", "theirs.py", args.theirs_python, theirs_job)]
        res = {}
        for side, script, python, job in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            res[side] = call(python, script, job, threads)
            print(f"round {r + 1}/{args.repeats} {side:6s} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
                f"{m} {res[side][m]['train_items_per_s']:.1f}/s train, {res[side][m]['sample_s_per_item']:.4f} s/sample"
                for m in ("decoder", "prior")), flush=True)
        rounds.append(res)

    summary = summarize(rounds)
    print()
    for model, unit in (("decoder", "images"), ("prior", "embeddings")):
        m = summary[model]
        print(f"{model}: training {m['ours']['train_items_per_s']:.1f} vs {m['theirs']['train_items_per_s']:.1f} "
              f"{unit}/s -> ours/theirs {m['train_ratio']:.2f}x (paired {m['train_ratio_paired']:.2f}x; bar {BAR}x: "
              f"{'met' if m['meets_bar'] else 'NOT met'})")
        print(f"{' ' * len(model)}  sampling {m['ours']['sample_s_per_item']:.4f} vs {m['theirs']['sample_s_per_item']:.4f} "
              f"s/{unit[:-1]} at {m['ours']['nfe_per_item']:g} vs {m['theirs']['nfe_per_item']:g} NFE -> ours "
              f"{m['sample_speedup']:.2f}x faster (paired {m['sample_speedup_paired']:.2f}x)")
    out = Path(args.out) if args.out else ROOT / "reports/bench" / (
        "dalle2_compare.quick.json" if args.quick else "dalle2_compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"quick": args.quick, "threads": threads, "precision": precision, "repeats": args.repeats,
              "warmup": args.warmup, "steps": args.steps, "load_average": os.getloadavg(),
              "matched": {"decoder": {"ours_params": d["params"], "ours_arch": d["arch"], "theirs": their_d},
                          "prior": {"ours_params": p["params"], "ours_arch": p["arch"], "theirs": their_p}},
              "jobs": {"ours": ours_job, "theirs": theirs_job}, "summary": summary, "rounds": rounds}
    out.write_text(json.dumps(report, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()

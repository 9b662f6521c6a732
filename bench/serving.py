"""Benchmark: seconds per image through `mlflow models serve` against the same sampling in process.

    python bench/serving.py [--models models] [--captions 4] [--n 2] [--repeats 5] [--seed 0]
        [--out reports/bench/serving.json]

Saves the bundle ``--models`` as the MLflow Model a registered version is (``serving.mlflow_model``,
in a temp dir; the bundle is only read), starts `mlflow models serve --env-manager local` on a free
loopback port and, on the same captions and seeds, times ``--repeats`` rounds of

    server     one POST /invocations of ``--captions`` captions x ``--n`` images (dataframe_split +
               params), the answer parsed and its PNGs base64-decoded: what a client waits for
    in_process ``generate_each`` on the bundle loaded here: what `unclip generate --out-dir` does
               once its models are loaded (each image alone from its own seed)
    batched    ``Unclip.generate`` on the same captions and n, one batch from one generator: the
               grid path of `unclip generate` and evaluate's, for scale (other images: other noise)

interleaved round-robin (a shared machine is noisy: medians, and the median of the paired
server / in_process ratios, are printed). One warm-up of each first. The server's PNGs are checked
against in_process's byte for byte. Prints the machine (CPU flags, cores, torch threads, load).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center",
            "a green triangle to the left of a yellow circle", "a purple square above an orange triangle",
            "a small cyan triangle at the bottom right", "a pink circle below a green square",
            "a large yellow square on the left", "an orange circle to the right of a blue triangle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, timeout: float = 300) -> subprocess.Popen:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import requests
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"the scoring server did not answer /ping within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def machine() -> str:
    import torch
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    isa = [f for f in ("avx512_bf16", "amx_tile") if f in flags]
    return (f"{os.cpu_count()} cores, {', '.join(isa) or 'no avx512_bf16/amx'}, torch threads "
            f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="models", help="A bundle: clip/ prior/ decoder/ upsampler_*/ (only read).")
    ap.add_argument("--captions", type=int, default=4)
    ap.add_argument("--n", type=int, default=2, help="Images per caption.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/bench/serving.json")
    args = ap.parse_args(argv)
    import requests

    from pipeline.generate import Unclip
    from pipeline.seeded import Prompt, generate_each
    from pipeline.serving import mlflow_model
    from pipeline.workspace import atomic_write_json

    captions = (CAPTIONS * (args.captions // len(CAPTIONS) + 1))[:args.captions]
    prompts = [Prompt(c, seed=args.seed, n=args.n) for c in captions]
    body = json.dumps({"dataframe_split": {"columns": ["caption"], "data": [[c] for c in captions]},
                       "params": {"seed": args.seed, "n": args.n}})
    images = len(captions) * args.n
    print(f"machine: {machine()}")
    unclip = Unclip.load(args.models)

    def in_process():
        return generate_each(unclip, prompts)["png"]

    def batched():
        return unclip.generate(captions, n=args.n, seed=args.seed)["images"]

    def server():
        r = requests.post(f"http://127.0.0.1:{port}/invocations", data=body,
                          headers={"Content-Type": "application/json"}, timeout=600)
        r.raise_for_status()
        return [base64.b64decode(p["image"]) for p in r.json()["predictions"]]

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        model = mlflow_model.save(Path(args.models), Path(tmp) / "model")
        port = free_port()
        t0 = time.perf_counter()
        proc = start_server(model, port)
        startup = time.perf_counter() - t0
        try:
            reference = in_process()
            served = server()
            identical = served == reference
            if not identical:
                print("warning: the server's PNGs differ from in-process generate_each's", file=sys.stderr)
            batched()
            times = {"server": [], "in_process": [], "batched": []}
            for r in range(args.repeats):
                for name, fn in (("server", server), ("in_process", in_process), ("batched", batched)):
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) / images)
                print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items())
                      + " s/image", flush=True)
        finally:
            stop(proc)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(s / i for s, i in zip(times["server"], times["in_process"]))
    result = {"models": str(Path(args.models).resolve()), "captions": len(captions), "n": args.n,
              "images_per_request": images, "repeats": args.repeats, "seed": args.seed, "machine": machine(),
              "server_startup_s": round(startup, 1), "identical_pngs": identical,
              "seconds_per_image": {k: round(v, 4) for k, v in med.items()}, "raw": times,
              "server_over_in_process": round(ratio, 3),
              "batched_over_in_process": round(statistics.median(b / i for b, i in zip(times["batched"],
                                                                                       times["in_process"])), 3)}
    print(f"\n{images} images per request ({len(captions)} captions x {args.n}), medians of {args.repeats}:")
    print("| path | s / image |\n| --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} |")
    print(f"server / in_process (median of paired ratios): {ratio:.2f}; "
          f"batched / in_process: {result['batched_over_in_process']:.2f}; server start {startup:.0f} s; "
          f"PNGs byte-identical: {identical}")
    out = Path(args.out)
    atomic_write_json(out, result)
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()

"""Your own data, end to end, as a user runs it: a URL list of ``--pairs`` image-text pairs without
ground truth (every image format and caption kind of tests/helpers/own_data.py: PNG with alpha or
a palette, grayscale/CMYK/EXIF-rotated JPEG, WebP, animated GIF, non-square, too small; Unicode,
emoji, one-word, empty and over-long captions; a few 404s) served on loopback, a fresh workspace
from `unclip init` where only ``crawl.url_list`` (and ``crawl.allow_private_hosts``, the list being served on loopback) is set, then `unclip --profile P run`. Prints the
flow's summary table as it ends, then the report's figures and where the report is.

    python bench/own_data.py --pairs 2200 --workspace /tmp/own-ws              # the default profile
    python bench/own_data.py --pairs 400 --profile smoke --workspace /tmp/own-smoke
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.own_data import build_site, static_server  # noqa: E402

from pipeline.workspace import init_workspace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2200, help="image-text pairs in the list (plus 3 that answer 404)")
    ap.add_argument("--profile", default="default", help="params.yaml profile for `unclip run`")
    ap.add_argument("--workspace", type=Path, required=True, help="a new directory for the workspace")
    args = ap.parse_args()
    if args.pairs < 20:
        ap.error("--pairs: at least 20")
    if args.workspace.exists():
        ap.error(f"--workspace {args.workspace} exists: give a new directory")
    site = args.workspace.with_name(args.workspace.name + "-site")
    rows = build_site(site, args.pairs)
    root = init_workspace(args.workspace)
    params = root / "params.yaml"
    text = params.read_text()
    # the one edit, and the opt-in a list served from this machine (loopback) needs (SECURITY.md)
    params.write_text(text.replace("  url_list: null", "  url_list: my_pairs.csv", 1)
                      .replace("  allow_private_hosts: false", "  allow_private_hosts: true", 1))
    t0 = time.perf_counter()
    with static_server(site) as base:
        import pandas as pd
        pd.DataFrame({"url": [f"{base}/{r['path']}" for r in rows],
                      "caption": [r["caption"] for r in rows]}).to_csv(root / "my_pairs.csv", index=False)
        rc = subprocess.call([str(Path(sys.executable).parent / "unclip"), "--profile", args.profile, "run"], cwd=root)
    print(f"\n`unclip --profile {args.profile} run` on {len(rows)} URLs: exit {rc}, {time.perf_counter() - t0:.0f} s")
    ev_path = root / "metrics" / "evaluate.json"
    if rc == 0 and ev_path.exists():
        ev = json.loads(ev_path.read_text())
        std = ev["standard"]
        print(f"ground truth: {ev.get('ground_truth')}; {ev['n_captions']} test captions; {std['metric']} {std['fid']} "
              f"(real vs real {std['fid_floor_real_vs_real']}), KID {std['kid_mean']}; CLIP score "
              f"{ev['clip_score_final']} (real images {ev['clip_score_real_images']}, shuffled captions "
              f"{ev['clip_score_shuffled_captions']}); prior cos(pred, image) {ev['prior']['cos_pred_image']}")
        for v, a in ev["ablation"].items():
            print(f"  ablation {v:<15} {std['metric']} {a['standard']['fid']}  CLIP score {a['clip_score']}")
        reports = sorted(p for p in (root / "reports").glob("*/report.html"))
        print(f"report: {reports[-1] if reports else '(none)'}; prompts: {ev.get('prompts')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

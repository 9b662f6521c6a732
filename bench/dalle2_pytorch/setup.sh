#!/usr/bin/env bash
# Create bench/dalle2_pytorch/.venv: DALLE2-pytorch beside the same torch as the project's venv.
# Its own venv because dalle2-pytorch pins open_clip_torch<3 (the project uses a newer one).
# torch/torchvision come from this machine's local wheels (pip's find-links / local index);
# nothing here downloads model weights. constraints.txt pins every other package to the set checked
# here (DALLE2-pytorch's dependencies are unpinned upstream and their APIs move).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3.11}"
[ -x "$here/.venv/bin/python" ] || "$py" -m venv "$here/.venv"
pip=("nice" "-n" "19" "$here/.venv/bin/python" "-m" "pip" "install" "--disable-pip-version-check")
"${pip[@]}" -r "$here/requirements.txt" -c "$here/constraints.txt"
"$here/.venv/bin/python" -c "import torch, dalle2_pytorch, importlib.metadata as m; \
print('torch', torch.__version__, '| dalle2-pytorch', m.version('dalle2-pytorch'), '| open_clip_torch', m.version('open_clip_torch'))"

"""Loading a CLIP directory never writes into it (reliability review H5): it may be read-only
(DVC's hardlinked cache, chmod 0444), a DVC cache object or an MLflow registry artifact, and a
write there changes what those track. Checked two ways: no file under the directory changes
(contents, mtime) and none appears, which holds for root too; and, for a user that file modes
bind (not root), loading from a directory made read-only with chmod -R a-w."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.clip import model as clip_model

REPO = Path(__file__).resolve().parent.parent


def state(root: Path) -> dict:
    """Every path under ``root`` (dirs too) -> (mtime_ns, sha256 of a file's bytes)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
    return out


@pytest.fixture
def clip_dir(tmp_path, smoke_cfg):
    out = tmp_path / "clip"
    clip_model.save(clip_model.build(smoke_cfg.clip.model), out, {"test": True})
    return out


def set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_clip_load_does_not_write_into_its_directory(clip_dir):
    before = state(clip_dir)
    set_writable(clip_dir, False)
    try:
        loaded = clip_model.load(clip_dir)
        again = clip_model.load(clip_dir)                  # a second load in the same process, too
    finally:
        set_writable(clip_dir, True)
    assert state(clip_dir) == before
    tokens = loaded.tokenize(["a red disc"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(tokens)[0], again.encode_text(tokens)[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes: the test above covers root")
def test_clip_loads_from_a_read_only_directory_as_a_non_root_user(clip_dir):
    set_writable(clip_dir, False)
    try:
        code = f"from pipeline.clip import model; print(model.load({str(clip_dir)!r}).embed_dim)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    finally:
        set_writable(clip_dir, True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "", ".hidden", "x" * 200])
def test_clip_model_name_cannot_become_a_path(clip_dir, tmp_path, name):
    config = json.loads((clip_dir / "open_clip_config.json").read_text())
    (clip_dir / "open_clip_config.json").write_text(json.dumps({**config, "name": name}))
    with pytest.raises(ValueError, match="CLIP model name"):
        clip_model.load(clip_dir)
    assert not (tmp_path / "escaped.json").exists() and not list(tmp_path.rglob("escaped.json"))

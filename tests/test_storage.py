"""Outputs under ``cluster.storage`` (pipeline/storage.py): the manifest writer and reader on
fsspec's ``memory://``, a real stage on a ``file://`` root outside the workspace, DVC deciding
staleness from the manifests in a real ``dvc repro``, checkpoints through fsspec."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest

from pipeline import storage
from pipeline.data import incremental
from pipeline.data.shards import shard_names, shard_paths
from pipeline.errors import StageError
from pipeline.workspace import Workspace, file_sha256

REPO = Path(__file__).resolve().parents[1]
FILES = {"00000.tar": b"a" * 3000, "00001.tar": b"b" * 2000, "img_emb/img_emb_0.npy": b"c" * 100}


def memory_root() -> str:
    return f"memory://unclip-test-{uuid.uuid4().hex[:8]}"


def make_output(out: Path, files: dict, parts=None) -> None:
    """An output folder as a data stage leaves it before the rename: files, incremental.json."""
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    (out / "crawl_log.parquet").write_bytes(b"small file that stays")
    incremental.write_state(out, {"recipe": "r", "parts": parts or [{"part": 0, "outputs": list(files)}]})


def published(tmp_path: Path, root: str, files=FILES) -> Path:
    ws = Workspace.at(tmp_path)
    out = ws.raw
    out.mkdir(parents=True)
    make_output(out, files)
    storage.publish(out, "data/raw", root)
    return out


def test_manifest_replaces_the_large_files_and_readers_go_through_it(tmp_path):
    root = memory_root()
    out = published(tmp_path, root)
    manifest = json.loads((out / storage.MANIFEST).read_text())
    assert manifest["root"] == root and sorted(manifest["objects"]) == sorted(FILES)
    assert sorted(p.name for p in out.rglob("*")) == ["MANIFEST.json", "crawl_log.parquet", "incremental.json"]
    fs = fsspec.filesystem("memory")
    for name, data in FILES.items():
        entry = manifest["objects"][name]
        assert entry["size"] == len(data) and entry["sha256"] == storage.sha256_bytes(data)
        assert entry["path"] == f"data/raw/{entry['sha256'][:16]}/{name}" and set(entry) == {"path", "size", "sha256"}
        assert fs.cat_file(root.removeprefix("memory://") + "/" + entry["path"]) == data
    assert shard_names(out) == ["00000.tar", "00001.tar"]
    paths = shard_paths(out)                          # fetched into the workspace's store cache
    assert [p.read_bytes() for p in paths] == [FILES["00000.tar"], FILES["00001.tar"]]
    assert all(str(p).startswith(str(tmp_path / ".unclip" / "store-cache")) for p in paths)
    assert incremental.shard_digests(out) == {n: storage.sha256_bytes(FILES[n]) for n in ("00000.tar", "00001.tar")}
    assert storage.output_bytes(out) > sum(map(len, FILES.values()))
    assert storage.check(out) == []


def test_same_bytes_make_the_same_manifest(tmp_path):
    root = memory_root()
    a = published(tmp_path / "a", root)
    b = published(tmp_path / "b", root)
    assert (a / storage.MANIFEST).read_bytes() == (b / storage.MANIFEST).read_bytes()


@pytest.mark.parametrize("change, says", [("rewrite", "holds other bytes"), ("delete", "is missing"),
                                          ("truncate", "holds 10 bytes")])
def test_an_object_changed_in_the_store_is_found_and_the_output_not_built_on(tmp_path, change, says):
    root = memory_root()
    out = published(tmp_path, root)
    entry = storage.read_manifest(out)["objects"]["00001.tar"]
    fs, base = storage.filesystem(root)
    url = storage.join(base, entry["path"])
    {"rewrite": lambda: fs.pipe_file(url, b"x" * 2000), "delete": lambda: fs.rm_file(url),
     "truncate": lambda: fs.pipe_file(url, b"x" * 10)}[change]()
    problems = storage.check(out)
    assert len(problems) == 1 and problems[0].startswith("00001.tar") and says in problems[0]
    found = storage.check_workspace(Workspace.at(tmp_path))
    assert found == {"data/raw": problems} and (out / storage.CHANGED).exists()
    before = (out / storage.CHANGED).read_bytes()
    storage.check_workspace(Workspace.at(tmp_path))
    assert (out / storage.CHANGED).read_bytes() == before          # the same finding: the same file
    state, why = incremental.previous(out, "r", True)
    assert state is None and "changed in the store" in why
    with pytest.raises(StageError, match="00001.tar|changed in the store|gone from the store"):
        storage.local_shards(out, ["00001.tar"])


def test_incremental_rerun_carries_earlier_objects_and_adds_new_ones(tmp_path):
    root = memory_root()
    old = published(tmp_path, root)
    new = tmp_path / "data" / "next"
    new.mkdir()
    state = incremental.read_state(old)
    incremental.link_outputs(state, old, new)                  # the earlier objects: manifest entries
    assert not list(new.glob("*.tar")) and storage.read_manifest(new)["objects"].keys() == FILES.keys()
    make_output(new, {"part001-00000.tar": b"d" * 500},
                parts=[*state["parts"], {"part": 1, "outputs": ["part001-00000.tar"]}])
    assert incremental.part_outputs(new, 1) == ["part001-00000.tar"]
    assert shard_names(new) == ["00000.tar", "00001.tar", "part001-00000.tar"]
    storage.publish(new, "data/raw", root)
    objects = storage.read_manifest(new)["objects"]
    assert {n: objects[n] for n in FILES} == storage.read_manifest(old)["objects"]    # carried, not copied
    assert [p.read_bytes() for p in shard_paths(new)] == [FILES["00000.tar"], FILES["00001.tar"], b"d" * 500]


def test_without_storage_a_carried_output_comes_back_into_the_workspace(tmp_path):
    old = published(tmp_path, memory_root())
    new = tmp_path / "data" / "next"
    new.mkdir()
    state = incremental.read_state(old)
    incremental.link_outputs(state, old, new)
    make_output(new, {}, parts=state["parts"])
    assert storage.publish(new, "data/raw", None) is None
    assert not (new / storage.MANIFEST).exists()
    assert {n: (new / n).read_bytes() for n in FILES} == FILES


def test_default_leaves_the_folder_as_it_is(tmp_path):
    out = tmp_path / "data" / "raw"
    out.mkdir(parents=True)
    make_output(out, FILES)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert storage.publish(out, "data/raw", None) is None
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("url, package", [("s3://bucket/unclip", "s3fs"), ("gs://bucket/unclip", "gcsfs")])
def test_a_store_whose_filesystem_is_not_installed_names_the_package(url, package):
    if importlib_available(package):
        pytest.skip(f"{package} is installed here")
    with pytest.raises(StageError, match=f"pip install {package}"):
        storage.filesystem(url)
    with pytest.raises(StageError, match=f"pip install {package}"):
        storage.checkpoint_root(url, Workspace.at("."))


def test_an_unknown_protocol_is_a_clear_error():
    with pytest.raises(StageError, match="no such protocol"):
        storage.filesystem("nosuchfs://bucket")


def importlib_available(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def test_storage_roots_and_checkpoint_locations(tmp_path):
    ws = Workspace.at(tmp_path)
    assert storage.root_url(None) is None
    assert storage.root_url(str(tmp_path / "s")) == storage.root_url(f"file://{tmp_path}/s") == f"file://{tmp_path}/s"
    assert storage.checkpoint_root(None, ws) == tmp_path / ".unclip" / "checkpoints"
    assert storage.checkpoint_root(f"file://{tmp_path}/s", ws) == tmp_path / "s" / "checkpoints"
    url = storage.checkpoint_root("memory://bucket/x/", ws)
    assert isinstance(url, storage.Url) and url == "memory://bucket/x/checkpoints"
    assert (url / "prior").name == "prior"


# ---- checkpoints through fsspec ---------------------------------------------------------------------
def test_checkpoints_in_an_object_store_resume_and_clear(monkeypatch, capsys):
    from pipeline.training import Checkpointer, clear_checkpoints, fit
    from test_training import batches, mse, setup          # the loop's own tiny run
    directory = storage.location(memory_root()) / "checkpoints" / "prior"
    monkeypatch.setenv("UNCLIP_CHECKPOINTS", str(directory.rsplit("/", 1)[0]))
    assert Workspace.at(".").checkpoints / "prior" == directory      # what the stages join
    ckpt = Checkpointer(directory, "k", every=3)

    class Killed(Exception):
        pass

    def die_at_7(step):
        if step == 7:
            raise Killed
    model, opt, sched = setup()
    with pytest.raises(Killed):
        fit(model, opt, sched, batches(), mse, steps=10, checkpointer=ckpt, after_step=die_at_7)
    fs, path = storage.filesystem(ckpt.path)
    assert fs.exists(path)
    model2, opt2, sched2 = setup(seed=1)
    summary = fit(model2, opt2, sched2, batches(), mse, steps=10, checkpointer=ckpt)
    assert summary["resumed_from"] == 6 and summary["steps"] == 10
    fs.pipe_file(path, fs.cat_file(path)[:100])                       # a truncated object
    model4, opt4, sched4 = setup()
    assert fit(model4, opt4, sched4, batches(), mse, steps=10, checkpointer=ckpt)["resumed_from"] == 0
    assert "does not load" in capsys.readouterr().out
    assert [p for p in fs.ls(path.rsplit("/", 1)[0], detail=False) if ".corrupt-" in p]
    clear_checkpoints(directory)
    assert not fs.exists(path)


# ---- a real stage on a file:// root outside the workspace --------------------------------------------
@pytest.fixture(scope="module")
def stored_filter(data_ws, smoke_cfg, tmp_path_factory):
    """The filter stage of data_ws's raw shards with cluster.storage a file:// root elsewhere."""
    from pipeline import config
    from pipeline.stages import run_stage
    ws = Workspace.at(tmp_path_factory.mktemp("stored_ws"))
    root = "file://" + str(tmp_path_factory.mktemp("store"))
    (ws.root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    shutil.copytree(data_ws.corpus, ws.corpus)
    shutil.copytree(data_ws.raw, ws.raw)
    cfg = smoke_cfg.model_copy(update={"cluster": config.ClusterConfig(storage=root)})
    figures = run_stage("filter", cfg, ws)
    return ws, cfg, root, figures


def test_filter_on_a_file_root_gives_the_local_bytes_through_the_manifest(stored_filter, data_ws):
    ws, cfg, root, figures = stored_filter
    assert not list(ws.filtered.glob("*.tar")) and (ws.filtered / storage.MANIFEST).exists()
    local = {p.name: p.read_bytes() for p in shard_paths(data_ws.filtered)}
    assert {p.name: p.read_bytes() for p in shard_paths(ws.filtered)} == local
    for name in ("dropped.parquet", "fingerprints.npz"):
        assert file_sha256(ws.filtered / name) == file_sha256(data_ws.filtered / name)
    baseline = json.loads(data_ws.metrics_path("filter").read_text())
    assert figures["kept"] == baseline["kept"] and figures["dropped_by_reason"] == baseline["dropped_by_reason"]
    for entry in storage.read_manifest(ws.filtered)["objects"].values():
        assert file_sha256(Path(root.removeprefix("file://")) / entry["path"]) == entry["sha256"]


def test_filter_rerun_builds_on_the_manifest_until_an_object_changes(stored_filter):
    from pipeline.stages import run_stage
    ws, cfg, root, _ = stored_filter
    manifest = (ws.filtered / storage.MANIFEST).read_bytes()
    again = run_stage("filter", cfg, ws)
    assert again["incremental"]["part"] is None and (ws.filtered / storage.MANIFEST).read_bytes() == manifest
    entry = storage.read_manifest(ws.filtered)["objects"]["00000.tar"]
    target = Path(root.removeprefix("file://")) / entry["path"]
    good = target.read_bytes()
    target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))          # one bit, the same size
    assert storage.check_workspace(ws) == {"data/filtered": ["00000.tar: " + entry["path"] + " holds other bytes"]}
    redone = run_stage("filter", cfg, ws)
    assert redone["incremental"]["part"] == 0 and "changed in the store" in redone["incremental"]["why"]
    assert target.read_bytes() == good and (ws.filtered / storage.MANIFEST).read_bytes() == manifest
    assert not (ws.filtered / storage.CHANGED).exists() and storage.check_workspace(ws) == {}


# ---- DVC decides staleness from the manifests -------------------------------------------------------
WRITER = """
import sys
from pathlib import Path
from pipeline import storage
from pipeline.data import incremental
from pipeline.workspace import Workspace
ws = Workspace.at(".")
with open("runs.txt", "a") as f:
    f.write("make\\n")
with storage.stage_output(sys.argv[1], ws, ws.raw) as out:
    for i in range(2):
        (out / f"0000{i}.tar").write_bytes(bytes([65 + i]) * 4096)
    incremental.write_state(out, {"recipe": "r", "parts": [{"part": 0, "outputs": ["00000.tar", "00001.tar"]}]})
"""


def test_dvc_repro_reruns_a_stage_whose_stored_object_changed(tmp_path):
    """A temp git+dvc repo: `config` (the project's `unclip config --write`, which checks the store)
    then a writer of data/raw under a file:// root, then a reader of it. DVC reruns the writer when
    an object changed behind its manifest, and, the bytes being the same again, not the reader."""
    repo, store = tmp_path / "ws", tmp_path / "store"
    repo.mkdir()
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (repo / "make.py").write_text(WRITER)
    py = sys.executable
    (repo / "dvc.yaml").write_text(f"""stages:
  config:
    cmd: {py} -m pipeline.cli config --write
    always_changed: true
    outs:
      - params.resolved.json:
          cache: false
          persist: true
  make:
    cmd: {py} make.py file://{store}
    deps: [make.py, params.resolved.json]
    outs:
      - data/raw:
          persist: true
  use:
    cmd: echo use >> runs.txt && cat data/raw/MANIFEST.json > used.json
    deps: [data/raw]
    outs: [used.json]
""")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}

    def sh(*cmd):
        return subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True).stdout

    sh("git", "init", "-q")
    sh(py, "-m", "dvc", "init", "-q")
    sh(py, "-m", "dvc", "repro", "-q")
    assert (repo / "runs.txt").read_text().split() == ["make", "use"]
    sh(py, "-m", "dvc", "repro", "-q")
    assert (repo / "runs.txt").read_text().split() == ["make", "use"]          # nothing stale
    entry = storage.read_manifest(repo / "data" / "raw")["objects"]["00001.tar"]
    (store / entry["path"]).write_bytes(b"Z" * 4096)
    assert "make" not in sh(py, "-m", "dvc", "status")                         # DVC alone cannot see it
    with pytest.raises(subprocess.CalledProcessError) as err:
        sh(py, "-m", "pipeline.cli", "storage", "check")
    assert "00001.tar" in err.value.stdout
    assert "changed outs" in sh(py, "-m", "dvc", "status")                     # now it can
    sh(py, "-m", "dvc", "repro", "-q")
    assert (repo / "runs.txt").read_text().split() == ["make", "use", "make"]  # the same bytes again: use stays
    assert (store / entry["path"]).read_bytes() == bytes([66]) * 4096
    (store / entry["path"]).unlink()
    sh(py, "-m", "dvc", "repro", "-q")                                         # config's check, then make
    assert (repo / "runs.txt").read_text().split() == ["make", "use", "make", "make"]
    status = sh(py, "-m", "dvc", "status")
    assert "make" not in status and "changed outs" not in status

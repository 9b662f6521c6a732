"""Each stage's code is its import closure (pipeline/codedeps.py), and dvc.yaml's deps cover it:
a file a stage imports that dvc.yaml leaves out would let DVC call a changed stage up to date."""
from __future__ import annotations

import functools
import textwrap

import yaml

from pipeline import codedeps
from pipeline.stages import STAGES


def dvc_deps() -> dict[str, list[str]]:
    """Every stage of dvc.yaml (foreach expanded as DVC names it: upsample@1) and its deps."""
    stages = yaml.safe_load((codedeps.ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((codedeps.ROOT / "params.yaml").read_text())
    out = {}
    for name, spec in stages.items():
        if "foreach" in spec:              # ${upsample.stages}: a section of params.yaml, by key
            items = functools.reduce(lambda d, k: d[k], spec["foreach"].strip("${}").split("."), params)
            for key in items:
                out[f"{name}@{key}"] = [str(d).replace("${key}", str(key)) for d in spec["do"].get("deps", [])]
        else:
            out[name] = [str(d) for d in spec.get("deps", [])]
    return out


def missing(code: tuple[str, ...], deps: list[str]) -> list[str]:
    """The files of ``code`` that no dep names, neither itself nor a folder above it."""
    return [f for f in code if not any(f == d.rstrip("/") or f.startswith(d.rstrip("/") + "/") for d in deps)]


def test_every_stage_of_the_registry_is_in_dvc_yaml():
    # `config` first: it writes params.resolved.json, the params of every other stage
    assert list(dvc_deps()) == ["config", *STAGES]


def test_dvc_yaml_deps_cover_each_stage_import_closure():
    deps = dvc_deps()
    gaps = {stage: missing(codedeps.closure(target.split(":")[0]), deps[stage]) for stage, target in STAGES.items()}
    assert not {s: g for s, g in gaps.items() if g}, f"dvc.yaml misses files its stages import: {gaps}"


def test_closure_follows_relative_absolute_lazy_and_registry_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import f\nimport pipeline.c\n",
        "b.py": "def f():\n    from .sub import d\n",
        "c.py": "TARGETS = {'x': 'pipeline.sub.e:run'}\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import b\nimport numpy\n",
        "sub/e.py": "",
        "unused.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(textwrap.dedent(text))
    monkeypatch.setattr(codedeps, "ROOT", tmp_path)
    codedeps.closure.cache_clear()
    try:
        assert codedeps.closure("pipeline.a") == tuple(sorted(
            f"pipeline/{p}" for p in ("__init__.py", "a.py", "b.py", "c.py", "sub/__init__.py", "sub/d.py", "sub/e.py")))
    finally:
        codedeps.closure.cache_clear()


def test_a_dvc_yaml_that_leaves_out_an_imported_file_fails():
    code = codedeps.closure("pipeline.embed")
    deps = [d for d in dvc_deps()["embed"] if d != "pipeline/data/shards.py"]
    assert missing(code, deps) == ["pipeline/data/shards.py"]


def import_graph() -> dict[str, set[str]]:
    """Every module of pipeline/ and flows/ -> the modules of ours it imports (statically, lazy
    imports and the registry's importlib targets included)."""
    graph = {}
    for package in codedeps.PACKAGES:
        for path in sorted((codedeps.ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(codedeps.ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[name] = codedeps._imported(name, path) - {name}
    return graph


def test_no_library_module_imports_a_stage_module():
    """Only the registry (and the flow, through it) reaches the stage modules; a library module
    or another stage that needs a stage's helper finds it in a library module."""
    stage_modules = {target.split(":")[0] for target in STAGES.values()}
    allowed = {"pipeline.stages"}
    found = {m: sorted(imps & stage_modules) for m, imps in import_graph().items()
             if m not in allowed and imps & stage_modules}
    assert not found, found


def test_no_import_cycle_importlib_included():
    graph = import_graph()
    state: dict[str, int] = {}          # 1: on the path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


if __name__ == "__main__":     # python tests/test_codedeps.py: each stage's code deps, for dvc.yaml
    for stage, target in STAGES.items():
        print(f"{stage}:\n" + "".join(f"  - {f}\n" for f in codedeps.closure(target.split(":")[0])))

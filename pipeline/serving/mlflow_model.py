"""A bundle saved as an MLflow Model (pyfunc flavor, models from code), and the bundle found again
in a registered version however it was registered.

The signature is what the scoring server checks before ``predict`` runs:

    inputs   caption: string (required); seed, n, steps, guidance: double (optional; whole numbers but guidance)
    params   seed (0), n (1), steps (the bundle's), guidance (the bundle's): defaults for every row
    outputs  prompt: long (the row), caption: string, seed: long, image: binary (PNG bytes; base64 in JSON)
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Optional

CODE = Path(__file__).with_name("model_code.py")
ARTIFACT = "bundle"                      # the key in ``context.artifacts`` and the folder under artifacts/
EXAMPLE_CAPTIONS = ["a small red circle in the top left", "a large blue square in the center"]
# what the model needs at inference, pinned to the versions it was saved with; `mlflow models serve
# --env-manager local` serves it in the current environment (this project's venv), which holds them
RUNTIME = ("unclip-pipeline", "mlflow", "torch", "diffusers", "open_clip_torch", "safetensors", "pandas", "pillow")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
    # double, not long: a column that some rows leave out arrives as NaN (unset), which MLflow cannot
    # cast to int64, and a long column would truncate 1.5 silently; request.py checks whole numbers
    # (seeds are exact up to its MAX_SEED, 2**53 - 1)
    inputs = Schema([ColSpec("string", "caption"), ColSpec("double", "seed", required=False),
                     ColSpec("double", "n", required=False), ColSpec("double", "steps", required=False),
                     ColSpec("double", "guidance", required=False)])
    outputs = Schema([ColSpec("long", "prompt"), ColSpec("string", "caption"), ColSpec("long", "seed"),
                      ColSpec("binary", "image")])
    params = ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("n", "long", 1),
                          ParamSpec("steps", "long", None), ParamSpec("guidance", "double", None)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example():
    """Two captions with their seeds, one image each."""
    import pandas as pd
    return pd.DataFrame({"caption": EXAMPLE_CAPTIONS, "seed": [0, 1]}), {"n": 1}


def requirements() -> list[str]:
    out = []
    for name in RUNTIME:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def save(bundle: Path, out: Path, *, metadata: Optional[dict] = None) -> Path:
    """Write ``bundle`` (clip/ prior/ decoder/ upsampler_*/, as ``Unclip.load`` reads it) as an MLflow
    Model in the new directory ``out``: the code file, the bundle copied under
    ``artifacts/<its folder's name>/``, signature, input example, requirements. Nothing is loaded or run on the
    weights (MLflow's own validation of the example, which would sample, is for ``log_model``)."""
    import mlflow
    mlflow.pyfunc.save_model(path=str(out), python_model=str(CODE), artifacts={ARTIFACT: str(bundle)},
                             signature=signature(), input_example=input_example(),
                             pip_requirements=requirements(), metadata=metadata)
    return Path(out)


def bundle_in(path: Path) -> Path:
    """The bundle directory inside a downloaded registered version: the MLflow Model's ``bundle``
    artifact (``artifacts/<the saved folder's name>``, as its MLmodel file records it), or ``path``
    itself for a version registered before versions were MLflow Models (a raw bundle folder, source
    ``<run>/bundle``)."""
    path = Path(path)
    if not (path / "MLmodel").exists():
        return path
    from mlflow.models import Model
    return path / Model.load(str(path / "MLmodel")).flavors["python_function"]["artifacts"][ARTIFACT]["path"]

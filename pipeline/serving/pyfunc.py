"""UnclipModel: a trained bundle behind MLflow's pyfunc interface.

    model = mlflow.pyfunc.load_model("models:/unclip-pipeline@champion")
    out = model.predict(pd.DataFrame({"caption": ["a small red circle in the top left"], "seed": [7]}),
                        params={"n": 2})
    out                # one row per image: prompt (row index), caption, seed, image (PNG bytes)

``load_context`` loads the bundle the MLflow Model carries as its ``bundle`` artifact with
``Unclip.load`` (safetensors and JSON only); ``predict`` checks the request
(``serving.request``) and samples through ``seeded.generate_each``, the path
`unclip generate --out-dir` takes, so a caption and seed give the same PNG bytes in both.
"""
from __future__ import annotations

import threading
from typing import Optional

import mlflow
import pandas as pd


class UnclipModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from ..generate import Unclip
        self.unclip = Unclip.load(context.artifacts["bundle"])
        # the scoring server may call predict from several threads: one request samples at a
        # time (the cores are shared anyway; interleaved, every request would finish later)
        self.lock = threading.Lock()

    # the DataFrame hint: MLflow takes the signature given at saving (mlflow_model.signature) as is
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from ..seeded import generate_each
        from .request import prompts
        try:
            asked = prompts(model_input, params)
            with self.lock:
                result = generate_each(self.unclip, asked)
        except ValueError as err:        # BadRequest, or a setting the bundle refuses: the scoring server's 400
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame({"prompt": result["prompts"], "caption": result["captions"], "seed": result["seeds"],
                             "image": result["png"]})

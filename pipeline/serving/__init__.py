"""The trained bundle as an MLflow Model: what `mlflow.pyfunc.load_model("models:/<name>@champion")`
loads and `mlflow models serve` serves.

    request.py      a request table (+ params) -> validated prompts; bad input -> BadRequest
    pyfunc.py       UnclipModel, the pyfunc PythonModel: load_context loads the bundle, predict
                    turns captions into PNG bytes through seeded.generate_each
    model_code.py   the models-from-code file (mlflow.models.set_model): logging and loading
                    run this code, nothing is pickled
    mlflow_model.py signature, input example, requirements; save a bundle as an MLflow Model;
                    find the bundle in a downloaded version (an MLflow Model or an older raw bundle)

An MLflow Model directory of this project (a registered version's source, ``<run>/model``)::

    MLmodel  model_code.py  python_env.yaml  conda.yaml  requirements.txt  input_example.json
    serving_input_example.json  evaluate.json (the gate reads it here)
    artifacts/bundle/   clip/ prior/ decoder/ upsampler_*/ (safetensors + model.json) evaluate.json
"""

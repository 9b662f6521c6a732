"""The MLflow Model's code (models from code: ``python_model=`` this file's path). MLflow runs this
file to get the model, when it is saved and whenever it is loaded: nothing is pickled. It is run
as a script, not imported as part of the package, hence the absolute import; the installed
``pipeline`` package does the work."""
import mlflow

from pipeline.serving.pyfunc import UnclipModel

mlflow.models.set_model(UnclipModel())

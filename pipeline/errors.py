"""The pipeline's own failures, apart from the stage registry (``pipeline.stages``) so that a stage
or a library module can raise them without importing the registry that imports the stages back."""


class StageError(RuntimeError):
    """A stage failed on bad input or configuration: retrying will not help."""


class SavedModelError(StageError, ValueError):
    """A saved model's directory that cannot be what it claims (a bad name, another kind): a
    ValueError for the callers that load models, a StageError (permanent) for the stages."""

"""The pipeline's own failures, apart from the stage registry (``pipeline.stages``) so that a stage
or a library module can raise them without importing the registry that imports the stages back."""


class StageError(RuntimeError):
    """A stage failed on bad input or configuration: retrying will not help."""


class BundleError(StageError, ValueError):
    """A model bundle that cannot be what it claims (a bad name, another kind): a ValueError for
    the callers that load bundles, a StageError (permanent) for the stages."""

"""Prefect flows: thin wrappers that run the pipeline stages through DVC."""

"""unclip-pipeline: a workflow-orchestrated data-and-training pipeline for unCLIP (DALL-E 2)."""
__version__ = "0.1.0"

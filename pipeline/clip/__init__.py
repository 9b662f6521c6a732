"""The pipeline's CLIP: model bundle, data, contrastive training, evaluation and the `clip` stage."""

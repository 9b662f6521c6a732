"""The pipeline's CLIP: the model (save, load, encode), data, contrastive training, evaluation and the `clip` stage."""

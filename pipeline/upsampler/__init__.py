"""The upsamplers of unCLIP: diffusion models that take the decoder's images up the resolution chain."""

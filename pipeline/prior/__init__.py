"""The diffusion prior of unCLIP: caption (z_t + token encodings) -> CLIP image embedding z_i."""

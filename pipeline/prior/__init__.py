"""The diffusion prior of unCLIP: caption -> CLIP image embedding (work in progress, issue 3)."""

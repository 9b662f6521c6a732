"""The decoder of unCLIP: CLIP image embedding (+ caption) -> image at the base resolution."""

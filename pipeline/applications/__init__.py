"""The applications of the unCLIP latent (DALL-E 2, section 3): ``edits`` (variations with DDIM
inversion, interpolation, text diffs, inpainting, as Python functions) and ``files`` (images,
masks, grids and GIFs on disk, for `unclip vary / interpolate / textdiff / inpaint`)."""
from ..images import psnr
from .edits import INVERSION_STEPS, Latent, inpaint, interpolate, slerp, textdiff, vary

__all__ = ["INVERSION_STEPS", "Latent", "inpaint", "interpolate", "psnr", "slerp", "textdiff", "vary"]

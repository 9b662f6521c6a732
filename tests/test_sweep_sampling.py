"""bench/sweep_sampling.py: which points of a sweep the trained models can take."""
from __future__ import annotations

import torch

from helpers.bench import load_bench


def test_the_sampling_sweep_skips_a_noise_level_for_an_upsampler_trained_without_one():
    """bench/sweep_sampling.py: a point is skipped, with the reason, where it would tell an upsampler trained
    without noise conditioning augmentation a level (pipeline/upsampler/diffusion.py refuses it); every other
    point runs."""
    sweep = load_bench("sweep_sampling")
    augmented, plain = torch.nn.Module(), torch.nn.Module()
    augmented.noise_aug = True
    ups = [(augmented, {}), (plain, {})]
    assert sweep.cannot_take({}, ups) is None and sweep.cannot_take({"upsampler_strength": 0.5}, ups) is None
    assert sweep.cannot_take({"upsampler_aug": [4.0, None]}, ups) is None
    assert sweep.cannot_take({"upsampler_aug": [0.0, 0.0]}, ups) is None
    assert "upsampler 2" in sweep.cannot_take({"upsampler_aug": [2.0, 2.0]}, ups)
    assert "upsampler 2" in sweep.cannot_take({"upsampler_aug": 2.0}, ups)
    assert "upsampler 1" in sweep.cannot_take({"upsampler_aug": 2.0}, [(plain, {})])

"""The unCLIP latent's applications: DDIM inversion and generalized DDIM of the decoder (against a
denoiser that is optimal for Gaussian data, so the only error is the sampler's), slerp, PSNR."""
from __future__ import annotations

import pytest
import torch

from pipeline import diffusion
from pipeline.applications import psnr, slerp
from pipeline.decoder import inversion
from pipeline.decoder.diffusion import Condition, DecoderSampling, sample

S, SIGMA = 8, 0.5


class GaussianDecoder(torch.nn.Module):
    """The decoder's call signature with the exact posterior mean for data x0 ~ N(0, SIGMA^2 I):
    E[x0 | x_t] = sqrt(a) SIGMA^2 / (a SIGMA^2 + 1 - a) x_t, returned as v (or epsilon)."""

    def __init__(self, prediction_type="v_prediction"):
        super().__init__()
        self.prediction_type = prediction_type
        self.alphas = diffusion.noise_schedule("epsilon").alphas_cumprod

    def forward(self, x, t, z_i, tokens, mask):
        a = self.alphas[t].view(-1, 1, 1, 1).to(x.dtype)
        x0 = a.sqrt() * SIGMA ** 2 / (a * SIGMA ** 2 + 1 - a) * x
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0 if self.prediction_type == "v_prediction" else eps


def cond(b=4, known=None, known_mask=None):
    return Condition(torch.zeros(b, 16), torch.zeros(b, 5, 8), torch.zeros(b, 5, dtype=torch.bool), known, known_mask)


def ddim(prediction_type, steps, eta=0.0):
    return DecoderSampling(diffusion.INVERTIBLE_DDIM, steps, 1.0, prediction_type, eta=eta)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_ddim_inversion_then_sampling_reconstructs_the_image(prediction_type):
    model = GaussianDecoder(prediction_type)
    x0 = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9    # images in [-1, 1]
    x_T = inversion.invert(model, x0, cond(), ddim(prediction_type, 100))
    assert x_T.std() > 3 * (x0.std() * model.alphas[990].sqrt())                 # it is noise, not the image
    rec = sample(model, cond(), ddim(prediction_type, 100), x_T=x_T)
    # the inversion reuses the output at tau_i for the step to tau_i+1: first order in the step
    # (measured: max error 0.054 at 50 steps, 0.027 at 100, 0.003 at 1000)
    assert (rec - x0).abs().max() < 0.04
    rough = sample(model, cond(), ddim(prediction_type, 10), x_T=inversion.invert(model, x0, cond(),
                                                                                 ddim(prediction_type, 10)))
    assert (rough - x0).abs().mean() > (rec - x0).abs().mean()                    # error shrinks with the step


def test_eta_moves_samples_away_from_the_reconstruction():
    model = GaussianDecoder()
    x0 = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    x_T = inversion.invert(model, x0, cond(), ddim("v_prediction", 50))
    dist = []
    for eta in (0.0, 0.3, 1.0):
        out = sample(model, cond(), ddim("v_prediction", 50, eta), x_T=x_T, generator=torch.Generator().manual_seed(2))
        dist.append((out - x0).pow(2).mean().item())
    assert dist[0] < 2e-3 and 5 * dist[0] < dist[1] < dist[2]      # eta 0: the reconstruction (50 steps)


def test_inpainting_keeps_the_known_region_exactly():
    model = GaussianDecoder()
    known = torch.rand(2, 3, S, S) * 2 - 1
    keep = torch.ones(2, 1, S, S)
    keep[..., 2:6, 2:6] = 0
    out = sample(model, cond(2, known, keep), ddim("v_prediction", 20, eta=1.0), x_T=torch.randn(2, 3, S, S),
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[keep.expand_as(out).bool()], known[keep.expand_as(known).bool()])
    assert (out - known)[..., 2:6, 2:6].abs().mean() > 0.05


def test_slerp_and_psnr():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([[2 ** -0.5, 2 ** -0.5]]), atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    assert torch.allclose(mid.norm(), torch.tensor(1.0))
    x = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    y = x.clone()
    y[0, 0, 0, 0] = 110                                    # mse = 100 / 48
    assert psnr(x, y).item() == pytest.approx(10 * torch.log10(torch.tensor(255.0 ** 2 * 48 / 100)).item(), rel=1e-5)
    with pytest.raises(ValueError):
        diffusion.InvertibleDDIM(0, "epsilon")

"""The prior's network and diffusion glue: shapes, guidance paths, rerank, a loss that learns."""
import torch
from helpers.numerics import reorder_atol

from pipeline.diffusion import noise_schedule
from pipeline.prior import diffusion, kinds
from pipeline.prior.network import UnclipPrior

B, D, W, L = 3, 16, 24, 8


def cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    tokens = torch.randn(B, L, W, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor([3, 5, 8])[:, None]
    return z_t, tokens, mask


def net():
    torch.manual_seed(0)
    return UnclipPrior(D, W, L, layers=1, heads=2, head_dim=8).eval()


def test_network_maps_to_image_embedding_shape():
    z_t, tokens, mask = cond()
    out = net()(torch.randn(B, D), torch.tensor([0, 500, 999]), z_t, tokens, mask)
    assert out.shape == (B, D) and torch.isfinite(out).all()


def test_dropping_the_condition_changes_the_prediction_and_zeroes_it():
    z_t, tokens, mask = cond()
    dz, dt, dm = diffusion.drop_condition(z_t, tokens, mask, torch.tensor([True, False, True]))
    assert (dz[0] == 0).all() and (dt[0] == 0).all() and not dm[0].any()
    assert torch.equal(dz[1], z_t[1]) and torch.equal(dm[1], mask[1])
    m, x, t = net(), torch.randn(B, D), torch.tensor([10, 10, 10])
    assert not torch.allclose(m(x, t, z_t, tokens, mask)[0], m(x, t, dz, dt, dm)[0])
    # a fully masked text (the unconditional input) must not produce NaN
    assert torch.isfinite(m(x, t, dz, dt, dm)).all()


def test_sample_with_and_without_guidance_and_rerank():
    z_t, tokens, mask = cond()
    m = net()
    caption, sampling = kinds.Caption(z_t, tokens, mask), kinds.PriorSampling(steps=4, n_candidates=2)
    for scale in (1.0, 3.0):
        stats = {}
        z = kinds.sample(m, caption, sampling.but(guidance_scale=scale), generator=torch.Generator().manual_seed(0),
                         stats=stats)
        assert z.shape == (B, D) and stats["nfe"] == 4 * (1 if scale == 1 else 2)       # per candidate
        assert torch.allclose(z.norm(dim=-1), torch.ones(B), atol=1e-5)
    # rerank keeps the candidate with the larger dot product with z_t: the candidates are one draw
    # per row of the caption repeated (caption-major), from the same generator
    four = sampling.but(n_candidates=4)
    best = kinds.sample(m, caption, four, generator=torch.Generator().manual_seed(0))
    cands = diffusion.sample(m, kinds.Caption(*(c.repeat_interleave(4, 0) for c in caption)), four,
                             generator=torch.Generator().manual_seed(0)).view(B, 4, D)
    dots = (cands * z_t[:, None, :]).sum(-1)
    assert torch.allclose((best * z_t).sum(-1), dots.max(dim=1).values)
    assert not torch.allclose(cands[:, 0], cands[:, 1])          # candidates differ


def test_training_loss_decreases_on_a_fixed_mapping():
    # z_i is a fixed function of z_t: the prior must learn it.
    torch.manual_seed(0)
    m = UnclipPrior(D, W, L, layers=2, heads=2, head_dim=16).train()
    proj = torch.nn.functional.normalize(torch.randn(D, D), dim=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = noise_schedule(diffusion.PREDICTION)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(150):
        z_t = torch.nn.functional.normalize(torch.randn(64, D, generator=g), dim=-1)
        z_i = torch.nn.functional.normalize(z_t @ proj, dim=-1)
        tokens, mask = torch.zeros(64, L, W), torch.ones(64, L, dtype=torch.bool)
        loss = diffusion.training_loss(m, z_i, z_t, tokens, mask, sched, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_written_out_attention_computes_what_the_sdpa_processor_does():
    """The prior runs diffusers' AttnProcessor with an fp32 softmax (faster on CPU at its lengths);
    outputs and gradients equal the SDPA processor's, the dropped caption included."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    z_t, tokens, mask = cond()
    mask[0] = False                                           # a dropped caption: only z_t and the rest
    x, t = torch.randn(B, D), torch.tensor([0, 500, 999])
    m = net().train()
    assert all(isinstance(p, AttnProcessor) for p in m.transformer.attn_processors.values())
    got = {}
    for name, proc in (("written out", AttnProcessor()), ("sdpa", AttnProcessor2_0())):
        m.transformer.set_attn_processor(proc)
        m.zero_grad(set_to_none=True)
        out = m(x, t, z_t, tokens, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        got[name] = (out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    (out_a, grads_a), (out_b, grads_b) = got.values()
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)        # fp32 summation order


def test_the_forward_without_padding_is_diffusers_forward():
    """UnclipPrior.forward cuts the captions' padding (rows sorted by caption length, in groups, the
    tokens after the caption keeping their positional embeddings): diffusers' PriorTransformer.forward
    over every token gives the same prediction and gradients, with a dropped caption, a caption with a
    hole in its mask, every row in one group or one group per row, and a scalar timestep."""
    g = torch.Generator().manual_seed(1)
    n = 7
    z_t, tokens = torch.randn(n, D, generator=g), torch.randn(n, L, W, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor([3, 0, 8, 1, 5, 5, 2])[:, None]
    mask[4, 1] = False                                                # a hole: a masked key before real ones
    x, t = torch.randn(n, D, generator=g), torch.randint(0, 1000, (n,), generator=g)
    torch.manual_seed(0)
    m = UnclipPrior(D, W, L, layers=2, heads=2, head_dim=8).train()
    weights = torch.randn(n, D, generator=g)

    def run(groups, timestep=t):
        m.zero_grad(set_to_none=True)
        out = m(x, timestep, z_t, tokens, mask, groups=groups)
        (out * weights).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    full, full_grads = run(0)
    for groups in (1, 2, 3, n, 2 * n):
        out, grads = run(groups)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
        assert grads.keys() == full_grads.keys()
        for k, grad in grads.items():
            # a key's bias moves every score of a query alike: its true gradient is 0, both are rounding; elsewhere
            # fp32 sums in another order, so the absolute tolerance grows with the gradient's scale
            atol = 1e-5 if k.endswith("to_k.bias") else reorder_atol(full_grads[k], 1e-6)
            torch.testing.assert_close(grad, full_grads[k], rtol=1e-4, atol=atol, msg=k)
    one = torch.tensor(500)
    torch.testing.assert_close(m(x, one, z_t, tokens, mask), m(x, one.expand(n), z_t, tokens, mask, groups=0))
    assert m.length_groups >= 1                                       # the stage runs the forward without padding

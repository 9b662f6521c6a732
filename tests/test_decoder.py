"""The decoder's network and diffusion glue: shapes, both conditioning paths, guidance, samplers."""
import pytest
import torch

from pipeline.decoder import diffusion as dd
from pipeline.decoder.network import UnclipDecoder
from pipeline.diffusion import Denoiser, in_batches, make_sampler, noise_schedule, sobolev_error, training_target

B, D, W, L, S = 3, 16, 12, 6, 8


def net(**kw):
    torch.manual_seed(0)
    args = dict(image_size=S, embed_dim=D, text_width=W, block_out_channels=[16, 32], attention=[False, True],
                head_dim=8, cross_attention_dim=16, extra_tokens=4) | kw
    return UnclipDecoder(**args).eval()


def cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    z_i = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    tokens = torch.randn(B, L, W, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor([2, 4, 6])[:, None]
    return z_i, tokens, mask


@pytest.mark.parametrize("block", ["transformer", "self_cross", "cross", "glide"])
def test_output_shape_and_both_conditioning_paths_matter(block):
    m, (z_i, tokens, mask) = net(attention_block=block), cond()
    x, t = torch.randn(B, 3, S, S), torch.tensor([5, 500, 900])
    out = m(x, t, z_i, tokens, mask)
    assert out.shape == (B, 3, S, S) and torch.isfinite(out).all()
    other_z = cond(1)[0]
    assert not torch.allclose(out, m(x, t, other_z, tokens, mask))               # z_i is used
    assert not torch.allclose(out, m(x, t, z_i, torch.randn(B, L, W), mask))     # the caption is used
    # masked-out caption tokens are ignored: changing them changes nothing
    tok2 = tokens.clone()
    tok2[0, 3:] = 100.0
    assert torch.allclose(out[0], m(x, t, z_i, tok2, mask)[0], atol=1e-5)


def test_z_i_reaches_the_unet_through_the_time_embedding_alone():
    # with no attention levels, the extra tokens are unused: z_i still conditions via the time embedding
    m = net(block_out_channels=[16, 32], attention=[False, False])
    z_i, tokens, mask = cond()
    x, t = torch.randn(B, 3, S, S), torch.tensor([5, 5, 5])
    assert not torch.allclose(m(x, t, z_i, tokens, mask), m(x, t, cond(1)[0], tokens, mask))


@pytest.mark.parametrize("block", ["transformer", "self_cross", "cross", "glide"])
def test_fully_dropped_condition_is_finite_and_differs(block):
    m, (z_i, tokens, mask) = net(attention_block=block), cond()
    yes = torch.ones(B, dtype=torch.bool)
    ez, et, em = dd.drop(z_i, tokens, mask, yes, yes)
    assert (ez == 0).all() and not em.any()
    x, t = torch.randn(B, 3, S, S), torch.tensor([5, 5, 5])
    out_u = m(x, t, ez, et, em)
    assert torch.isfinite(out_u).all() and not torch.allclose(out_u, m(x, t, z_i, tokens, mask))


def test_drop_rates_in_training_follow_the_paper():
    z_i, tokens, mask = torch.ones(4000, D), torch.ones(4000, L, W), torch.ones(4000, L, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    dz, dt, dm = dd.drop(z_i, tokens, mask, torch.rand(4000, generator=g) < 0.1, torch.rand(4000, generator=g) < 0.5)
    assert abs((dz[:, 0] == 0).float().mean().item() - 0.1) < 0.02
    assert abs((~dm[:, 0]).float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_sampling_with_and_without_guidance(sampler):
    m, (z_i, tokens, mask) = net(), cond()
    condition, sampling = dd.Condition(z_i, tokens, mask), dd.DecoderSampling(sampler=sampler, steps=3)
    for scale, nfe in ((1.0, 3), (3.0, 6)):
        stats = {}
        x = dd.sample(m, condition, sampling.but(guidance_scale=scale), generator=torch.Generator().manual_seed(0),
                      stats=stats)
        assert x.shape == (B, 3, S, S) and x.abs().max() <= 1 and stats["nfe"] == nfe
    a = dd.sample(m, condition, sampling, generator=torch.Generator().manual_seed(7))
    b = dd.sample(m, condition, sampling, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)                                                      # seeded


def test_sampling_reads_the_saved_info_and_overrides_it_and_batches_keep_rows():
    info = {"prediction_type": "v_prediction", "sampling": {"sampler": "dpm++", "steps": 8, "guidance_scale": 2.0}}
    s = dd.DecoderSampling.of(info, steps=3, guidance_scale=None)                  # None: the saved one
    assert (s.sampler, s.steps, s.guidance_scale, s.prediction_type, s.eta) == ("dpm++", 3, 2.0, "v_prediction", 0.0)
    m, condition = net(), dd.Condition(*cond())
    x_T = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(1))
    ddim = s.but(sampler="ddim")                                  # deterministic from x_T: rows independent
    whole = dd.sample(m, condition, ddim, x_T=x_T)
    assert torch.allclose(in_batches(dd.sample, m, condition, ddim, 2, x_T=x_T), whole, atol=1e-5)
    assert torch.allclose(in_batches(dd.sample, m, condition, ddim, 1, x_T=x_T)[2], whole[2], atol=1e-5)


def test_guidance_combines_conditional_and_unconditional():
    d = Denoiser(lambda x, t: torch.full_like(x, 2.0), lambda x, t: torch.full_like(x, 1.0), scale=3.0)
    out = d(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(out, torch.full((2, 3), 4.0)) and d.nfe == 2            # 1 + 3 * (2 - 1)


def test_guidance_in_one_doubled_batch_equals_two_passes():
    m, (z_i, tokens, mask) = net(), cond()
    no = torch.ones(B, dtype=torch.bool)
    empty = dd.drop(z_i, tokens, mask, no, no)
    x, t = torch.randn(B, 3, S, S), torch.tensor([5, 500, 900])
    joint = Denoiser.guided(m, (z_i, tokens, mask), empty, 2.5)
    two = Denoiser(lambda x, t: m(x, t, z_i, tokens, mask), lambda x, t: m(x, t, *empty), 2.5)
    assert torch.allclose(joint(x, t), two(x, t), atol=1e-5)
    assert joint.nfe == two.nfe == 2        # the second pass counts, batched or not


@pytest.mark.parametrize("block", ["transformer", "glide"])
def test_attention_heads_have_head_dim_dimensions_and_norm_groups_keep_channels_together(block):
    # diffusers reads attention_head_dim as the number of heads: 32 of 4 dimensions unless corrected
    # (the transformer blocks); the glide blocks read it as the width
    m = UnclipDecoder(image_size=16, embed_dim=D, text_width=W, block_out_channels=[32, 64, 128],
                      attention=[False, False, True], head_dim=32, cross_attention_dim=32, attention_block=block)
    attn = [a for a in m.modules() if type(a).__name__ == "Attention"]
    assert attn and all(a.heads == 4 and a.inner_dim // a.heads == 32 for a in attn)
    norms = [g for g in m.unet.modules() if isinstance(g, torch.nn.GroupNorm)]
    assert norms and min(g.num_channels // g.num_groups for g in norms) >= 4     # never instance norm


def test_glide_block_is_one_attention_over_the_image_and_the_context_without_feed_forward():
    # GLIDE's block: the context tokens' keys/values join the image's own in one attention; the
    # transformer block has two attentions (self, cross) and a feed-forward per level
    glide, transformer = net(attention_block="glide"), net()
    kinds = lambda m: {type(x).__name__ for x in m.modules()}                   # noqa: E731
    assert "FeedForward" in kinds(transformer) and "FeedForward" not in kinds(glide)
    attn = [a for a in glide.modules() if type(a).__name__ == "Attention"]
    assert attn and all(a.add_k_proj is not None and a.add_v_proj is not None for a in attn)
    assert sum(p.numel() for p in glide.parameters()) < sum(p.numel() for p in transformer.parameters())
    with pytest.raises(ValueError, match="attention_block"):
        net(attention_block="other")


def test_ddim_with_a_perfect_denoiser_recovers_x0():
    # if the network predicted the true noise exactly, DDIM (eta = 0) lands on x0
    sched = noise_schedule("epsilon")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x_T = sched.add_noise(x0, noise, torch.tensor([999, 999]))
    alphas = sched.alphas_cumprod

    def oracle(x, t):
        a = alphas[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    from pipeline.diffusion import sample_loop
    out = sample_loop(oracle, x_T, make_sampler("ddim", 10, "epsilon"))
    assert torch.allclose(out, x0, atol=1e-3)
    assert torch.equal(training_target(sched, x0, noise, torch.tensor([3, 4])), noise)


def test_training_loss_decreases():
    torch.manual_seed(0)
    m = net().train()
    sched = noise_schedule("epsilon")
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    z_i, tokens, mask = cond()
    x0 = torch.zeros(B, 3, S, S)
    x0[:, 0] = 0.8                                                                  # red-ish images
    losses = []
    for _ in range(40):
        loss = dd.training_loss(m, x0, z_i, tokens, mask, sched, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


@pytest.mark.parametrize("layout_hidden", [0, 24])
def test_layout_map_carries_z_i_and_the_caption_summary(layout_hidden):
    m, (z_i, tokens, mask) = net(layout_channels=4, layout_hidden=layout_hidden), cond()
    assert isinstance(m.layout, torch.nn.Sequential) == bool(layout_hidden)      # an MLP, or a linear map
    x, t = torch.randn(B, 3, S, S), torch.tensor([5, 500, 900])
    out = m(x, t, z_i, tokens, mask)
    assert out.shape == (B, 3, S, S)
    # the last *valid* token feeds the layout: changing a masked-out token changes nothing
    tok2 = tokens.clone()
    tok2[0, 3:] = 100.0
    assert torch.allclose(out[0], m(x, t, z_i, tok2, mask)[0], atol=1e-5)
    tok3 = tokens.clone()
    tok3[0, 1] = tok3[0, 1] + 5.0          # row 0's last valid token (mask length 2)
    assert not torch.allclose(out[0], m(x, t, z_i, tok3, mask)[0])


def test_learned_variance_hybrid_loss_is_finite_and_trains_the_variance_channels():
    from pipeline.diffusion import learned_log_variance, vlb_term
    m, (z_i, tokens, mask) = net(learned_variance=True), cond()
    x0 = torch.rand(B, 3, S, S) * 2 - 1
    sched = noise_schedule("v_prediction")
    out = m(torch.randn(B, 3, S, S), torch.tensor([0, 10, 999]), z_i, tokens, mask)
    assert out.shape == (B, 6, S, S) and out[:, 3:].abs().max() <= 1      # variance channels bounded (tanh)
    m.train()
    loss = dd.training_loss(m, x0, z_i, tokens, mask, sched, snr_gamma=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    head = m.unet.conv_out.weight.grad
    assert head[3:].abs().sum() > 0          # the bound reaches the variance channels
    # the log variance stays inside [log posterior var, log beta] for any channel value, and the
    # bound is finite at the extremes and at t = 0 (the discretized decoder term)
    t = torch.tensor([0, 1, 500, 999])
    for v in (-1.0, 0.0, 1.0):
        lv = learned_log_variance(sched, t, torch.full((4, 3, S, S), v))
        assert torch.isfinite(lv).all()
        x0 = torch.rand(4, 3, S, S) * 2 - 1
        terms = vlb_term(sched, x0, sched.add_noise(x0, torch.randn_like(x0), t), t, x0 + 0.1,
                         torch.full((4, 3, S, S), v))
        assert torch.isfinite(terms).all() and (terms >= -1e-4).all()


def test_learned_variance_vlb_is_zero_when_the_model_is_the_posterior():
    from pipeline.diffusion import vlb_term
    sched = noise_schedule("v_prediction")
    t = torch.tensor([1, 300, 700])
    x0 = torch.rand(3, 3, S, S) * 2 - 1
    x_t = sched.add_noise(x0, torch.randn_like(x0), t)
    # v = -1: the model's variance is the posterior's, and with the true x0 the KL vanishes
    kl = vlb_term(sched, x0, x_t, t, x0, torch.full_like(x0, -1.0))
    assert kl.abs().max() < 1e-4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_learned_variance_samples_with_every_sampler(sampler):
    m, (z_i, tokens, mask) = net(learned_variance=True), cond()
    x = dd.sample(m, dd.Condition(z_i, tokens, mask), dd.DecoderSampling(sampler, 3, 2.0, "v_prediction"),
                  generator=torch.Generator().manual_seed(0))
    assert x.shape == (B, 3, S, S) and torch.isfinite(x).all()


def test_sobolev_error_weighs_each_frequency_and_keeps_the_mean_as_minimiser():
    n = 16
    flat = torch.ones(2, 3, n, n)
    checker = (torch.arange(n)[:, None] + torch.arange(n)[None, :]).remainder(2).float().mul(2).sub(1)
    checker = checker.expand(2, 3, n, n)
    assert torch.allclose(sobolev_error(flat, 0.0), torch.ones(2))
    assert torch.allclose(sobolev_error(flat, 2.0), torch.ones(2))            # no gradient: as the MSE
    # the Nyquist error: every forward difference is +-2, so it weighs 1 + 8 * weight
    assert torch.allclose(sobolev_error(checker, 0.5), torch.full((2,), 1 + 0.5 * 8))
    # a fixed quadratic form: over several targets v_k, its minimiser is their mean (the gradient is 0 there)
    targets = torch.randn(5, 3, n, n)
    f = targets.mean(0, keepdim=True).requires_grad_(True)
    sobolev_error(f - targets, 1.0).sum().backward()
    assert f.grad.abs().max() < 1e-5
    g = (f.detach() + 0.1 * torch.randn_like(f)).requires_grad_(True)
    assert sobolev_error(g - targets, 1.0).sum() > sobolev_error(f.detach() - targets, 1.0).sum()


def test_training_loss_with_the_sobolev_term_is_the_mse_plus_the_differences():
    m, (z_i, tokens, mask) = net(), cond()
    x0 = torch.rand(B, 3, S, S) * 2 - 1
    sched = noise_schedule("v_prediction")
    m.eval()

    def loss(w):
        return dd.training_loss(m, x0, z_i, tokens, mask, sched, generator=torch.Generator().manual_seed(3),
                                sobolev_weight=w)
    plain, h1 = loss(0.0), loss(1.0)
    assert torch.isfinite(h1) and h1 > plain
    assert torch.allclose(loss(2.0) - plain, 2 * (h1 - plain), rtol=1e-4)       # linear in the weight


def test_layout_weight_adds_the_layout_maps_regression_of_the_clean_image():
    # layout_weight > 0: the layout map's first 3 channels regress x0, under the same condition drops
    m, (z_i, tokens, mask) = net(layout_channels=4), cond()
    x0 = torch.rand(B, 3, S, S) * 2 - 1
    sched = noise_schedule("v_prediction")
    m.eval()

    def loss(w):
        return dd.training_loss(m, x0, z_i, tokens, mask, sched, generator=torch.Generator().manual_seed(3),
                                p_drop_image=0.0, p_drop_caption=0.0, layout_weight=w)
    out, layout = m(torch.randn(B, 3, S, S), torch.tensor([1, 2, 3]), z_i, tokens, mask, return_layout=True)
    assert layout.shape == (B, 4, S, S) and torch.equal(layout, m.layout_map(z_i * D ** 0.5, tokens, mask))
    expected = (layout[:, :3] - x0).square().mean()
    assert torch.allclose(loss(2.0) - loss(0.0), 2 * expected, rtol=1e-4)
    # the regression trains the layout map: its gradient reaches the layout's weights with the UNet's
    m.train()
    m.zero_grad()
    loss(1.0).backward()
    assert m.layout.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="3 or more layout channels"):
        dd.training_loss(net(), x0, z_i, tokens, mask, sched, layout_weight=1.0)
    from pipeline.config import DecoderConfig
    with pytest.raises(ValueError, match="layout_channels must be 3 or more"):
        DecoderConfig(layout_channels=2, layout_weight=1.0)


def test_the_decoders_own_text_encoder_is_bidirectional_over_the_valid_tokens():
    # text_layers > 0: GLIDE's text encoder over the caption's tokens, trained with the decoder
    m, (z_i, tokens, mask) = net(text_layers=2), cond()
    assert net().text_layers == 0 and not hasattr(net(), "text_encoder")      # off: CLIP's tokens through a linear map
    x, t = torch.randn(B, 3, S, S), torch.tensor([5, 500, 900])
    out = m(x, t, z_i, tokens, mask)
    assert out.shape == (B, 3, S, S) and torch.isfinite(out).all()
    enc = m.encode_caption(m.token_proj(tokens), mask)
    later = tokens.clone()
    later[2, 5] += 3.0                  # row 2's last valid token
    enc2 = m.encode_caption(m.token_proj(later), mask)
    assert not torch.allclose(enc[2, 0], enc2[2, 0])      # the first token sees the last (CLIP's tower is causal)
    assert torch.allclose(enc[:2], enc2[:2])               # and rows do not mix
    padded = tokens.clone()
    padded[0, 3:] = 100.0               # masked-out tokens change nothing
    assert torch.allclose(out[0], m(x, t, z_i, padded, mask)[0], atol=1e-5)
    # a dropped caption (no valid token) stays finite, in training too, and differs from the full condition
    yes = torch.ones(B, dtype=torch.bool)
    dropped = dd.drop(z_i, tokens, mask, yes, yes)
    for mode in (m.eval(), m.train()):
        assert torch.isfinite(mode(x, t, *dropped)).all()
    assert not torch.allclose(m.eval()(x, t, *dropped), out)

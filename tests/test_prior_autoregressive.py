"""The autoregressive prior (DALL-E 2 section 2.2): its code (PCA + buckets), causality, the
key/value cache, seeded sampling, a loss that learns, and a self-describing bundle."""
import json

import torch
import torch.nn.functional as F

from pipeline import bundle
from pipeline.config import PriorConfig
from pipeline.prior import autoregressive, kinds
from pipeline.prior.autoregressive import AutoregressivePrior
from pipeline.prior.codebook import Codebook

D, W, L, K = 16, 24, 6, 8


def embeddings(n=2000, seed=0):
    """Unit z_i in (mostly) an 8-dimensional subspace of D, and z_t correlated with them."""
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(99)))[0][:, :8]
    g = torch.Generator().manual_seed(seed)
    z_i = F.normalize(torch.randn(n, 8, generator=g) @ basis.t() + 0.02 * torch.randn(n, D, generator=g), dim=-1)
    z_t = F.normalize(z_i + 0.5 * torch.randn(n, D, generator=g) / D ** 0.5, dim=-1)
    return z_i, z_t


def cond(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_t = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    tokens = torch.randn(b, L, W, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor([2, 4, 6][:b])[:, None]
    return z_t, tokens, mask


def fitted_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = AutoregressivePrior(D, W, L, components=K, buckets=32, dot_buckets=8, layers=2, heads=2, head_dim=8, **kw)
    m.codebook.fit(*embeddings())
    return m.eval()


def test_codebook_round_trip_keeps_the_embedding_and_reports_it():
    z_i, z_t = embeddings()
    cb = Codebook(D, K, 64, 8)
    fit = cb.fit(z_i, z_t)
    assert 0.99 < fit["explained_variance"] <= 1.0          # 8 components of an 8-dimensional cloud
    held, _ = embeddings(500, seed=1)
    rt = cb.round_trip(held)
    assert rt["cos_pca"] > 0.995 and rt["cos_quantized"] > 0.98 and rt["cos_quantized"] <= rt["cos_pca"] + 1e-4
    codes = cb.encode(held)
    assert codes.shape == (500, K) and codes.min() >= 0 and codes.max() < 64
    # equal-mass buckets: every bucket of every component is used on the training data
    train_codes = cb.encode(z_i)
    assert all(len(train_codes[:, k].unique()) == 64 for k in range(K))
    assert torch.allclose(cb.decode(codes).norm(dim=-1), torch.ones(500), atol=1e-5)
    # fewer components keep less
    assert Codebook(D, 2, 64, 8).fit(z_i, z_t)["explained_variance"] < fit["explained_variance"]


def test_dot_code_top_half():
    z_i, z_t = embeddings()
    cb = Codebook(D, K, 16, 8)
    cb.fit(z_i, z_t)
    dots = cb.dot_code(z_i, z_t)
    assert torch.bincount(dots, minlength=8).min() >= len(z_i) // 8 - 2       # equal mass
    drawn = cb.sample_dot_code(1000, torch.Generator().manual_seed(0))
    assert drawn.min() >= 4 and drawn.max() <= 7 and len(drawn.unique()) == 4


def test_the_transformer_is_causal_and_ignores_padding():
    m = fitted_model()
    z_t, tokens, mask = cond()
    codes = torch.randint(0, 32, (3, K), generator=torch.Generator().manual_seed(0))
    dot = torch.tensor([1, 5, 7])
    logits = m(codes, z_t, tokens, mask, dot)
    assert logits.shape == (3, K, 32) and torch.isfinite(logits).all()
    j = 4
    changed = codes.clone()
    changed[:, j] = (changed[:, j] + 1) % 32
    after = m(changed, z_t, tokens, mask, dot)
    # logits[:, k] predict code k from codes < k: changing code j leaves k <= j alone
    assert torch.allclose(logits[:, :j + 1], after[:, :j + 1], atol=1e-6)
    assert not torch.allclose(logits[:, j + 1:], after[:, j + 1:])
    # padded caption positions are never attended to
    noisy = tokens.clone()
    noisy[~mask] = 100.0
    assert torch.allclose(m(codes, z_t, noisy, mask, dot), logits, atol=1e-5)
    # the unconditional input (everything dropped) is finite and differs
    drop = torch.ones(3, dtype=torch.bool)
    un = m(codes, z_t, tokens, mask, dot, drop)
    assert torch.isfinite(un).all() and not torch.allclose(un, logits)
    assert torch.allclose(un, m(codes, torch.randn(3, D), tokens * 3, mask, dot.flip(0), drop), atol=1e-5)


def test_cached_sampling_matches_the_teacher_forced_pass():
    m = fitted_model()
    z_t, tokens, mask = cond()
    g = torch.Generator().manual_seed(0)
    # at a vanishing temperature sampling is greedy: each code is the argmax of the full pass's logits
    stats = {}
    codes, dot = autoregressive.sample_codes(m, z_t, tokens, mask, temperature=1e-6, generator=g, stats=stats)
    assert stats["nfe"] == K and codes.shape == (3, K)
    greedy = m(codes, z_t * D ** 0.5, tokens, mask, dot).argmax(-1)
    assert torch.equal(greedy, codes)


def test_sampling_is_seeded_guided_and_unit_norm():
    m = fitted_model()
    z_t, tokens, mask = cond()
    caption = kinds.Caption(z_t, tokens, mask)
    sampling = kinds.PriorSampling(sampler="autoregressive", steps=K, guidance_scale=1.0, temperature=1.0)
    a = kinds.sample(m, caption, sampling, generator=torch.Generator().manual_seed(3))
    b = kinds.sample(m, caption, sampling, generator=torch.Generator().manual_seed(3))
    c = kinds.sample(m, caption, sampling, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, D) and torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    stats = {}
    guided = kinds.sample(m, caption, sampling.but(guidance_scale=3.0, n_candidates=1), generator=torch.Generator(),
                          stats=stats)
    assert guided.shape == (3, D) and stats["nfe"] == 2 * K


def test_training_loss_learns_a_fixed_mapping():
    z_i, _ = embeddings(4000)
    z_t = F.normalize(z_i @ torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5)))[0], dim=-1)
    torch.manual_seed(0)
    m = AutoregressivePrior(D, W, L, components=4, buckets=16, dot_buckets=4, layers=2, heads=2, head_dim=16)
    m.codebook.fit(z_i, z_t)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    tokens, mask = torch.zeros(128, L, W), torch.ones(128, L, dtype=torch.bool)
    losses = []
    for _ in range(150):
        idx = torch.randint(0, len(z_i), (128,), generator=g)
        loss = autoregressive.training_loss(m, z_i[idx], z_t[idx], tokens, mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # chance is log(16) = 2.77 nats per code; z_t (a rotation of z_i) carries all of it
    assert sum(losses[:10]) / 10 > 2.5 and sum(losses[-20:]) / 20 < 2.0


def test_saved_prior_is_self_describing(tmp_path):
    p = PriorConfig.model_validate({"kind": "autoregressive", "layers": 2, "heads": 2, "head_dim": 8,
                                    "autoregressive": {"components": K, "buckets": 32, "dot_buckets": 8}})
    arch = kinds.arch_of(p, D, W, L)
    m = fitted_model()
    assert arch == {"embed_dim": D, "text_width": W, "context_length": L, "layers": 2, "heads": 2, "head_dim": 8,
                    "dropout": 0.0, "kind": "autoregressive", "components": K, "buckets": 32, "dot_buckets": 8}
    bundle.save_model(tmp_path, m, kind="prior", arch=arch, run_config={}, info=kinds.sampling_info(p))
    loaded, meta = bundle.load_model(tmp_path, "prior", kinds.build)
    assert isinstance(loaded, AutoregressivePrior) and meta["info"]["prior_kind"] == "autoregressive"
    assert torch.equal(loaded.codebook.components, m.codebook.components)     # the fit travels with the weights
    z_t, tokens, mask = cond()
    s = kinds.PriorSampling.of(meta["info"])
    assert (s.sampler, s.steps, s.temperature, s.n_candidates) == ("autoregressive", K, p.autoregressive.temperature,
                                                                   p.n_candidates)
    caption = kinds.Caption(z_t, tokens, mask)
    assert torch.equal(kinds.sample(loaded, caption, s, generator=torch.Generator().manual_seed(0)),
                       kinds.sample(m, caption, s, generator=torch.Generator().manual_seed(0)))
    # a prior saved before the autoregressive prior (no kind in its arch) is a diffusion prior
    old = json.loads((tmp_path / "model.json").read_text())["arch"]
    assert type(kinds.build(**{k: v for k, v in old.items()
                               if k not in ("kind", "components", "buckets", "dot_buckets")})).__name__ == "UnclipPrior"


def test_compared_priors_fail_clearly(tmp_path):
    import pytest

    from pipeline import prior_comparison
    from pipeline.stages import StageError
    models = tmp_path / "models"
    (models / "clip").mkdir(parents=True)
    (models / "clip" / "model.safetensors").write_bytes(b"weights")
    p = PriorConfig.model_validate({"kind": "autoregressive", "layers": 2, "heads": 2, "head_dim": 8,
                                    "autoregressive": {"components": K, "buckets": 32, "dot_buckets": 8}})
    for name, sha in (("prior", None), ("other", "0" * 64)):
        bundle.save_model(models / name, fitted_model(), kind="prior", arch=kinds.arch_of(p, D, W, L),
                          run_config={}, info=kinds.sampling_info(p), clip={"sha256": sha})
    got = prior_comparison.load_priors(tmp_path, models, {}, "cpu")
    assert list(got) == ["cascade"] and isinstance(got["cascade"][0], AutoregressivePrior)
    with pytest.raises(StageError, match=r"compare_priors\['x'\].*no trained prior"):
        prior_comparison.load_priors(tmp_path, models, {"x": "models/nope"}, "cpu")
    with pytest.raises(StageError, match="another CLIP"):
        prior_comparison.load_priors(tmp_path, models, {"x": "models/other"}, "cpu")
    with pytest.raises(StageError, match="cascade's own prior"):
        prior_comparison.load_priors(tmp_path, models, {"cascade": "models/other"}, "cpu")

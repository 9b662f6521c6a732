"""The upsamplers: network shapes, training-time corruptions, a loss that learns, sampling with
every sampler, and a save/load round trip. Tiny networks; no workspace."""
import pytest
import torch
import torch.nn.functional as F

from pipeline import bundle
from pipeline.config import Config, DecoderConfig, UpsampleConfig, UpsamplerConfig
from pipeline.diffusion import SAMPLERS, noise_schedule
from pipeline.images import psnr, resize, to_uint8
from pipeline.upsampler import diffusion
from pipeline.upsampler.degrade import degrade, noise_augment, smooth_augment, smooth_field
from pipeline.upsampler.network import Upsampler, norm_groups
from pipeline.upsampler.stage import TrainingPairs, chain_sizes, crop_size

ARCH = {"block_out_channels": [8, 16], "layers_per_block": 1}
INFO = {"in_size": 8, "out_size": 16, "prediction_type": "epsilon", "sampling": {"sampler": "ddim", "steps": 2}}


def upsample(model, info, low, z_i=None, generator=None, **overrides):
    """The upsampler's sampling contract as the chain calls it: a saved model's info, a call's overrides."""
    sampling = diffusion.UpsamplerSampling.of(info, **overrides)
    return diffusion.sample(model, diffusion.Condition(low, z_i), sampling, generator=generator)


def net(seed=0):
    torch.manual_seed(seed)
    return Upsampler(**ARCH).eval()


def shapes(seed=0, b=4, size=16):
    """Smooth random images [b, 3, size, size] in [-1, 1] with some edges: squares on a gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-0.8, 0.8, size).view(1, 1, 1, size).expand(b, 3, size, size).clone()
    for i in range(b):
        r, c = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, r:r + size // 2, c:c + size // 2] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x


def high_freq_energy(x):
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(x, lap, groups=3).pow(2).mean().item()


def test_network_is_fully_convolutional():
    m, t = net(), torch.tensor([0, 999])
    for size in (8, 16, 32):                                 # a crop, the full image, larger
        x = torch.randn(2, 3, size, size)
        out = m(x, t, torch.randn(2, 3, size, size))
        assert out.shape == (2, 3, size, size) and torch.isfinite(out).all()
    # the conditioning image reaches the output
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(m(x, t, torch.zeros_like(x)), m(x, t, torch.ones_like(x)))
    # GroupNorm groups divide every level's channels and keep >= 4 channels per group
    assert norm_groups([32, 64, 128]) == 8 and norm_groups([48, 96]) == 12 and norm_groups([128, 256]) == 32
    assert norm_groups([8, 16]) == 2 and norm_groups([2, 4]) == 1


def test_conditioned_upsampler_sees_z_i_and_needs_it():
    torch.manual_seed(0)
    m = Upsampler(**ARCH, embed_dim=8).eval()
    x, t, low = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 3, 16, 16)
    z = F.normalize(torch.randn(2, 8), dim=-1)
    assert not torch.allclose(m(x, t, low, z), m(x, t, low, torch.zeros_like(z)))
    with pytest.raises(ValueError, match="z_i"):
        m(x, t, low)
    with pytest.raises(ValueError, match="z_i"):
        upsample(m, INFO, torch.zeros(2, 3, 8, 8))
    out = upsample(m, INFO, torch.zeros(2, 3, 8, 8), z_i=z, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)
    # training: the loss reaches z_i's projection; dropped embeddings are zeros
    loss = diffusion.training_loss(m.train(), shapes(b=2), low, noise_schedule("v_prediction"), z_i=z,
                                   p_drop_image=0.5, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert m.embed_proj.linear_1.weight.grad.abs().sum() > 0
    # the unconditioned network ignores z_i (the paper's upsampler)
    plain = net()
    assert torch.equal(plain(x, t, low, z), plain(x, t, low))


def test_training_pairs_carry_z_i_for_a_conditioned_upsampler():
    pairs = TrainingPairs("blur", 8, 16, 8, seed=0)
    imgs = [((shapes(seed=i, b=1)[0] + 1) * 127.5).round().to(torch.uint8) for i in range(3)]
    z = [torch.full((8,), float(i)) for i in range(3)]
    x0, low, z_i = pairs(list(zip(imgs, z)))
    assert x0.shape == low.shape == (3, 3, 8, 8) and torch.equal(z_i, torch.stack(z))


def test_noise_augmented_upsampler_is_told_the_level_and_needs_it():
    torch.manual_seed(0)
    m = Upsampler(**ARCH, noise_aug=True).eval()
    x, t, low = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 3, 16, 16)
    assert not torch.allclose(m(x, t, low, aug_level=torch.zeros(2)), m(x, t, low, aug_level=torch.full((2,), 8.0)))
    with pytest.raises(ValueError, match="aug_level"):
        m(x, t, low)
    info = INFO | {"sampling": INFO["sampling"] | {"aug_level": 6.0}}
    # sampling noises the low-res input at the saved level (drawn from the generator: a seed, the
    # same image), and a level of 0 leaves it as it is
    g = lambda: torch.Generator().manual_seed(0)        # noqa: E731
    low8 = shapes(b=2, size=8)
    a, b = upsample(m, info, low8, generator=g()), upsample(m, info, low8, generator=g())
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, upsample(m, info, low8, generator=g(), aug_level=0.0))
    # the level is what the network is told
    seen = []
    m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["aug_level"]), with_kwargs=True)
    upsample(m, info, low8, generator=g(), aug_level=3.0)
    assert seen and all(torch.equal(s, torch.full((2,), 3.0)) for s in seen)
    # a network trained without it cannot be asked for a level
    with pytest.raises(ValueError, match="without noise conditioning augmentation"):
        upsample(net(), info, low8, generator=g())
    # training: the loss reaches the level's embedding
    loss = diffusion.training_loss(m.train(), shapes(b=2), low, noise_schedule("v_prediction"),
                                   aug_level=torch.tensor([0.0, 9.0]), generator=g())
    loss.backward()
    assert m.aug_embed.linear_1.weight.grad.abs().sum() > 0


def test_noise_augment_adds_the_asked_level():
    x = torch.zeros(4, 3, 32, 32)
    levels = torch.tensor([0.0, 2.0, 8.0, 16.0])
    out = noise_augment(x, levels, torch.Generator().manual_seed(0))
    sd = (out * 255 / 2).std(dim=(1, 2, 3))                  # in 8-bit levels
    assert sd[0] == 0 and torch.allclose(sd[1:], levels[1:], rtol=0.1)
    assert torch.equal(out, noise_augment(x, levels, torch.Generator().manual_seed(0)))
    assert noise_augment(torch.ones(1, 3, 8, 8), torch.tensor([16.0]), torch.Generator()).max() <= 1


def test_training_pairs_with_noise_aug_carry_their_levels():
    images = [((shapes(seed=i, b=1, size=32)[0] + 1) * 127.5).round().to(torch.uint8) for i in range(6)]
    x0, cond, levels = TrainingPairs("blur", 8, 16, crop=8, seed=0, noise_aug=12.0)(images)
    assert x0.shape == cond.shape == (6, 3, 8, 8) and levels.shape == (6,)
    assert (levels >= 0).all() and (levels <= 12).all() and levels.std() > 0
    clean_x0, clean_cond = TrainingPairs("blur", 8, 16, crop=8, seed=0)(images)
    assert not torch.equal(cond, clean_cond)                # the conditioning crops are noised
    # with z_i: (x0, cond, z_i, levels)
    z = [torch.full((8,), float(i)) for i in range(6)]
    out = TrainingPairs("blur", 8, 16, 8, seed=0, noise_aug=12.0)(list(zip(images, z)))
    assert len(out) == 4 and torch.equal(out[2], torch.stack(z)) and out[3].shape == (6,)


def test_smooth_field_is_smooth_unit_and_seeded():
    g = torch.Generator().manual_seed(0)
    f = smooth_field((6, 3, 16, 16), g)
    assert torch.allclose(f.std((-2, -1)), torch.ones(6, 3), atol=1e-4)
    assert f.mean((-2, -1)).abs().max() < 1e-5
    white = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # blurred over 1-3 px: far less high-frequency energy than white noise of the same spread
    assert high_freq_energy(f) < 0.3 * high_freq_energy(white)
    assert torch.equal(f, smooth_field((6, 3, 16, 16), torch.Generator().manual_seed(0)))


def test_smooth_augment_adds_up_to_the_asked_level_and_only_to_the_condition():
    x = torch.zeros(64, 3, 16, 16)
    out = smooth_augment(x, 12.0, torch.Generator().manual_seed(0))
    sd = (out * 255 / 2).std(dim=(2, 3)).mean(1)             # per image, in 8-bit levels
    assert sd.max() <= 12.01 and sd.min() < 3 and sd.max() > 9          # levels ~ U[0, 12]
    assert smooth_augment(torch.ones(2, 3, 8, 8), 12.0, torch.Generator()).max() <= 1
    images = [((shapes(seed=i, b=1, size=32)[0] + 1) * 127.5).round().to(torch.uint8) for i in range(6)]
    out = TrainingPairs("blur", 8, 16, crop=8, seed=0, smooth_aug=12.0)(images)
    assert len(out) == 2 and out[0].shape == out[1].shape == (6, 3, 8, 8)      # nothing told to the network
    assert not torch.equal(out[1], TrainingPairs("blur", 8, 16, crop=8, seed=0)(images)[1])


def test_aug_level_beyond_the_trained_levels_is_refused():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="noise_aug"):
        UpsamplerConfig(sampling={"aug_level": 4.0})
    assert UpsamplerConfig(noise_aug=16.0, sampling={"aug_level": 4.0}).sampling.aug_level == 4.0


@pytest.mark.parametrize("kind", ["blur", "bsr"])
def test_degradation_shape_range_determinism_and_effect(kind):
    low = shapes(b=6, size=16)
    out = degrade(kind, low, torch.Generator().manual_seed(3))
    assert out.shape == low.shape and out.dtype == low.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, degrade(kind, low, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, degrade(kind, low, torch.Generator().manual_seed(4)))
    # every image is changed, by more than uint8 rounding (at its square's edges at least)
    assert ((out - low).abs().amax(dim=(1, 2, 3)) > 5 / 255).all()
    if kind == "blur":                                        # a low-pass filter
        noise = torch.rand(6, 3, 16, 16) * 2 - 1
        assert high_freq_energy(degrade(kind, noise, torch.Generator().manual_seed(0))) < 0.5 * high_freq_energy(noise)


def test_blur_sigma_sets_how_much_the_training_input_is_blurred():
    noise = torch.rand(6, 3, 16, 16) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)                  # noqa: E731
    assert torch.equal(degrade("blur", noise, g()), degrade("blur", noise, g(), (0.4, 0.6)))     # the default
    light, heavy = degrade("blur", noise, g(), (0.2, 0.2)), degrade("blur", noise, g(), (1.2, 1.2))
    assert high_freq_energy(heavy) < 0.3 * high_freq_energy(light)
    images = [((shapes(seed=i, b=1, size=32)[0] + 1) * 127.5).round().to(torch.uint8) for i in range(6)]
    x0, cond = TrainingPairs("blur", 8, 16, crop=8, seed=0, blur_sigma=(1.2, 1.2))(images)
    x0_d, cond_d = TrainingPairs("blur", 8, 16, crop=8, seed=0)(images)
    assert torch.equal(x0, x0_d) and (cond.float() - x0.float()).abs().mean() > (cond_d.float() - x0.float()).abs().mean()
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="blur_sigma"):
        UpsamplerConfig(blur_sigma=(0.8, 0.4))
    assert UpsamplerConfig(blur_sigma=[0.4, 1.2]).blur_sigma == (0.4, 1.2)
    # degrade.py keeps its own copy of the default (importing the config would make the upsample stages' DVC code
    # deps include pipeline/config.py): the two must agree
    from pipeline.upsampler.degrade import BLUR_SIGMA
    assert UpsamplerConfig().blur_sigma == BLUR_SIGMA


def test_degradation_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade("sharpen", shapes(), torch.Generator())


def test_training_pairs_crop_target_and_condition_at_the_same_place():
    images = [((shapes(seed=i, b=1, size=32)[0] + 1) * 127.5).round().to(torch.uint8) for i in range(3)]
    x0, cond = TrainingPairs("blur", 8, 16, crop=8, seed=0)(images)
    assert x0.shape == cond.shape == (3, 3, 8, 8) and x0.dtype == cond.dtype == torch.uint8
    # the conditioning crop is a blurred version of the target crop: close, not equal
    diff = (x0.float() - cond.float()).abs().mean()
    assert 0 < diff < 40
    assert torch.equal(x0, TrainingPairs("blur", 8, 16, crop=8, seed=0)(images)[0])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_strength_truncates_the_schedule_and_starts_near_the_condition(sampler):
    from pipeline.diffusion import make_sampler
    full = make_sampler(sampler, 4, "v_prediction")
    half = make_sampler(sampler, 4, "v_prediction", strength=0.5)
    from pipeline.diffusion import run_timesteps
    assert len(run_timesteps(half)) == 4 and int(run_timesteps(full)[0]) == 999
    assert torch.equal(run_timesteps(half), make_sampler(sampler, 8, "v_prediction").timesteps[4:])
    with pytest.raises(ValueError, match="strength"):
        make_sampler(sampler, 4, "v_prediction", strength=0)
    # a network that predicts v = 0 (x0 = the noised input, scaled): from a low strength the
    # output stays near the bicubic upsample it started from; from pure noise it does not
    class ZeroV(torch.nn.Module):
        multiple = 2

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, cond, z_i=None):
            return torch.zeros_like(x)

    low = shapes(b=2, size=8)
    info = INFO | {"prediction_type": "v_prediction", "sampling": {"sampler": sampler, "steps": 2}}
    near = upsample(ZeroV(), info, low, strength=0.05, generator=torch.Generator().manual_seed(0))
    far = upsample(ZeroV(), info, low, generator=torch.Generator().manual_seed(0))
    assert near.shape == (2, 3, 16, 16) and torch.isfinite(near).all()
    assert (near - resize(low, 16)).abs().mean() < 0.1 < (far - resize(low, 16)).abs().mean()


def test_sizes_of_the_chain_and_crops():
    cfg = Config(decoder=DecoderConfig(image_size=16),
                 upsample=UpsampleConfig(stages={"1": UpsamplerConfig(scale=2), "2": UpsamplerConfig(scale=4)}))
    assert chain_sizes(cfg) == {"1": (16, 32), "2": (32, 128)}
    assert crop_size(32, 0.5, 4) == 16 and crop_size(64, 0.5, 4) == 32 and crop_size(32, 0.1, 4) == 4


def test_training_loss_decreases():
    # x0: squares on a gradient; condition: its bicubic down-up copy. The network must learn
    # to separate the noise from the image it is told about.
    torch.manual_seed(0)
    m = Upsampler(**ARCH).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    schedule = noise_schedule("epsilon")
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        x0 = shapes(seed=int(torch.randint(0, 10_000, (1,), generator=g)), b=16, size=16)
        cond = resize(resize(x0, 8), 16)
        loss = diffusion.training_loss(m, x0, cond, schedule, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def test_training_loss_sobolev_term_adds_the_error_differences():
    m = Upsampler(**ARCH).eval()
    x0 = shapes(b=4, size=16)
    cond = resize(resize(x0, 8), 16)

    def loss(w):
        return diffusion.training_loss(m, x0, cond, noise_schedule("v_prediction"), residual=True, residual_scale=8.0,
                                       generator=torch.Generator().manual_seed(2), sobolev_weight=w)
    plain, h1 = loss(0.0), loss(1.0)
    assert torch.isfinite(h1) and h1 > plain
    assert torch.allclose(loss(3.0) - plain, 3 * (h1 - plain), rtol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_upsample_with_each_sampler(sampler):
    low = shapes(size=8)
    out = upsample(net(), INFO, low, sampler=sampler, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16) and out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()


def test_upsample_rejects_sizes_the_network_cannot_take():
    m = Upsampler(block_out_channels=[8, 16, 32], layers_per_block=1)     # needs multiples of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        upsample(m, INFO, shapes(size=5))


def test_saved_upsampler_gives_the_same_samples(tmp_path):
    m = net(seed=5)
    info = {**INFO, "key": "1", "degradation": "blur"}
    bundle.save_model(tmp_path / "up", m, kind="upsampler", arch=ARCH, run_config={}, info=info)
    loaded, meta = diffusion.load(tmp_path / "up")
    assert meta["info"] == info and meta["arch"] == ARCH
    low = shapes(size=8)
    a = upsample(m, info, low, generator=torch.Generator().manual_seed(7))
    b = upsample(loaded, meta["info"], low, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = upsample(loaded, meta["info"], low, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)


def test_psnr():
    x = shapes()
    assert (psnr(to_uint8(x), to_uint8(x)) > 90).all()
    noisy = x + 0.1 * torch.randn_like(x)
    assert 20 < psnr(to_uint8(noisy), to_uint8(x)).mean() < 30                   # sigma 0.1 on [-1, 1] = 12.75 / 255: ~26 dB


def test_stage_without_shards_or_with_an_unknown_key_says_what_is_wrong(tmp_path):
    from pipeline.stages import StageError
    from pipeline.upsampler.stage import run
    from pipeline.workspace import Workspace
    ws = Workspace.at(tmp_path)
    with pytest.raises(StageError, match="run the filter stage first"):
        run(Config(), ws, "1")
    with pytest.raises(StageError, match="no upsampler '3'"):
        run(Config(), ws, "3")


@pytest.mark.parametrize("bf16", [False, True])
def test_sampling_layout_changes_speed_not_samples(bf16):
    """for_sampling (channels_last, bf16 weights) gives the plain network's samples up to rounding,
    and a conditioned upsampler still takes its z_i."""
    torch.manual_seed(3)
    arch = {**ARCH, "embed_dim": 8}
    plain = Upsampler(**arch).eval()
    fast = diffusion.for_sampling(Upsampler(**arch).eval(), bf16)
    fast.load_state_dict(plain.state_dict())
    conv = next(p for p in fast.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert conv.dtype == (torch.bfloat16 if bf16 else torch.float32)
    low, z_i = shapes(size=8), F.normalize(torch.randn(4, 8), dim=-1)
    info = {**INFO, "prediction_type": "v_prediction"}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        a = upsample(plain, info, low, generator=torch.Generator().manual_seed(1), z_i=z_i)
        b = upsample(fast, info, low, generator=torch.Generator().manual_seed(1), z_i=z_i)
    assert b.dtype == torch.float32 and b.is_contiguous()
    assert (a - b).abs().max() < (0.1 if bf16 else 1e-4)


def test_residual_target_diffuses_the_difference_to_the_bicubic_upsample(monkeypatch):
    """SRDiff's target: the loss on x0 with ``residual`` is the plain loss on x0 - bicubic, and
    sampling adds the bicubic upsample back to what the sampler returns."""
    m, schedule = net(seed=2), noise_schedule("v_prediction")
    x0 = shapes(b=4, size=16)
    cond = resize(resize(x0, 8), 16)
    a = diffusion.training_loss(m, x0, cond, schedule, generator=torch.Generator().manual_seed(0), residual=True)
    b = diffusion.training_loss(m, x0 - cond, cond, schedule, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    monkeypatch.setattr(diffusion, "sample_loop", lambda denoiser, x_T, scheduler, generator: torch.zeros_like(x_T))
    low = shapes(size=8)
    info = INFO | {"prediction_type": "v_prediction", "target": "residual"}
    assert torch.allclose(upsample(m, info, low), resize(low, 16).clamp(-1, 1))
    assert upsample(m, INFO | {"prediction_type": "v_prediction"}, low).abs().max() == 0


def test_residual_scale_diffuses_k_times_the_residual_and_divides_the_sample_by_k(monkeypatch):
    """``residual_scale`` k: the loss is the plain loss on k (x0 - bicubic); sampling divides what
    the sampler returns by k before adding the bicubic upsample back, and widens the sampler's
    x0 clipping to the scaled residual's range [-2k, 2k]."""
    m, schedule = net(seed=2), noise_schedule("v_prediction")
    x0 = shapes(b=4, size=16)
    cond = resize(resize(x0, 8), 16)
    a = diffusion.training_loss(m, x0, cond, schedule, generator=torch.Generator().manual_seed(0), residual=True,
                                residual_scale=8.0)
    b = diffusion.training_loss(m, 8.0 * (x0 - cond), cond, schedule, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    seen = {}

    def fake_loop(denoiser, x_T, scheduler, generator):
        seen["clip"] = scheduler.config.clip_sample_range
        return torch.full_like(x_T, 0.8)                     # a scaled residual of 0.8 -> 0.1 in the image

    monkeypatch.setattr(diffusion, "sample_loop", fake_loop)
    low = shapes(size=8)
    info = INFO | {"prediction_type": "v_prediction", "target": "residual", "residual_scale": 8.0}
    assert torch.allclose(upsample(m, info, low), (resize(low, 16) + 0.1).clamp(-1, 1))
    assert seen["clip"] == 16.0

"""Benchmark: training throughput of every model of the pipeline, against the machine's matmul peak.

    python bench/train_throughput.py [--models clip,clip+negatives,clip-negatives,clip+negatives-shared,
                                               clip+negatives-padded,clip-full-table,
                                               judge,judge-nchw,prior,prior-sdpa,prior-padded,decoder,decoder+text-encoder,
                                               upsample@1,upsample@2]
        [--repeats 5] [--warmup 3] [--steps 2] [--profile default] [--profile-model decoder]
        [--params params.yaml] [--quick] [--out reports/bench/train_throughput.json]

Every model is built as its stage builds it, at its params.yaml config (``--profile``), and
trained on synthetic inputs of the stage's shapes (random uint8 images, unit-norm random
embeddings of CLIP's ``embed_dim``, random token encodings [B, context_length, text_width] with
masks, real token ids of the corpus's own captions for CLIP), so no workspace or data is needed. One step is
``training.fit``'s step: draw a batch, forward + the stage's own loss under the stage's autocast,
backward, gradient clipping, optimizer (the stage's AdamW), EMA (the diffusion models:
``training.build_optimizer``, the recipe of ``train_diffusion_model``), lr scheduler. Batches
are drawn by indexing an in-memory pool, as ``embeddings.train_batches`` and CLIP's
``clip.data.train_batches`` do; for the upsamplers, whose stage decodes and collates in a
DataLoader worker, the pool holds finished batches made by the stage's own ``TrainingPairs``, so
their "data" is only the main process's share. The judge's stream is the stage's own ``batches`` (with its degradations).
``clip`` is CLIP as configured; ``clip+negatives`` with NegCLIP's two hard negatives per caption
(``clip.hard_negatives: [relation, binding]``: its text tower encodes three captions per image) and
``clip-negatives`` without any, whatever the config says, to time the two side by side;
``clip+negatives-padded`` encodes every caption at the full context length (the stage before
``clip.model.text_embeddings`` cut the padding away); ``clip+negatives-shared`` encodes each negative from the
first token it changes (``clip.shared_prefix: true``, ``clip/shared_prefix.py``); ``clip-full-table`` trains the text tower's
whole token table instead of the rows its captions use (the stage before ``clip/vocab.py``);
``judge-nchw`` runs the judge's body in NCHW instead of channels-last (before). ``prior-sdpa`` is the prior with PyTorch's
SDPA attention processor instead of its written-out one, to time the two side by side; ``prior-padded`` runs
diffusers' forward over all of the context's tokens instead of the prior's, which cuts the captions' padding
(``prior/network.py``). ``decoder+text-encoder`` is the decoder with its own text encoder of two layers
(``decoder.text_layers: 2``). The token encodings' masks end where the corpus's captions do.

Figures, per model (the table):

    batch        the config's batch size
    precision    bf16 or fp32: what ``device.use_bf16(precision, device)`` picks for the model
    GFLOP/step   forward + backward FLOPs of one step at that batch, counted by
                 torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; the
                 optimizer, EMA and elementwise ops count 0); the forward share is in the JSON
    s/step       median over --repeats timed blocks of --steps steps each, after --warmup steps;
                 the blocks go round-robin over every model and batch size (and the peak's
                 matmuls), so noise from other work on the machine hits all of them alike. Each
                 block starts with --settle untimed steps: the turn before it (another model or
                 batch size, a 2048 matmul) leaves the caches and oneDNN's primitive cache
                 holding its own work, which made a block's first step of the decoder at batch 32
                 slower than a training run's steps (docs/MEASURED.md, twenty-third session)
    GFLOP/s      GFLOP/step / s/step
    % peak       model FLOP utilisation (MFU): GFLOP/s over the measured matmul peak of the
                 model's precision (bf16 autocast still runs some ops in fp32: a bound, not a split)
    fixed s      the intercept a of the least-squares line s/step = a + b * batch over the batch
                 sweep (batch/4, batch/2, batch): per-step cost that does not shrink with the batch
                 (Python and op dispatch, optimizer, EMA, small kernels)
    fixed %      a / (s/step at the config's batch): the share of a step that more samples per
                 step would amortise

The peak: the median GFLOP/s of a large square ``torch.mm`` (2048 on CPU, 8192 on GPU) after a
warm-up, in fp32 and, where the device computes it natively, in bf16. The profile
(``--profile-model``, default the decoder): ``torch.profiler`` over a few steps, ms per step of
each phase (data, forward, backward, clip+optimizer, EMA) and the top ops by self CPU time.
``--quick`` (batch 2 and 1, one repeat, small matmuls) checks that everything runs; its figures
mean nothing. Writes the figures to ``--out`` (JSON, atomically).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

# kineto's own log: on a CUDA build without a GPU the profiler prints a spurious
# "gpuGetDeviceCount failed" ERROR line (read when torch is imported)
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config, diffusion  # noqa: E402
from pipeline.clip import model as clip_model  # noqa: E402
from pipeline.clip import train as clip_train  # noqa: E402
from pipeline.clip.negatives import KINDS as NEGATIVE_KINDS, hard_negatives  # noqa: E402
from pipeline.clip.train import param_groups  # noqa: E402
from pipeline.clip.vocab import UsedRows  # noqa: E402
from pipeline.data.scenes import BACKGROUNDS, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, caption, sample_scene  # noqa: E402
from pipeline.decoder.network import UnclipDecoder  # noqa: E402
from pipeline.decoder.stage import arch_of as decoder_arch, training_fns  # noqa: E402
from pipeline.judge import stage as judge_stage  # noqa: E402
from pipeline.judge.labels import target_tensor  # noqa: E402
from pipeline.judge.network import JudgeNet  # noqa: E402
from pipeline.diffusion import noise_schedule  # noqa: E402
from pipeline.prior import diffusion as prior_diffusion  # noqa: E402
from pipeline.prior.network import UnclipPrior  # noqa: E402
from pipeline.prior import stage as prior_stage  # noqa: E402
from pipeline.prior.stage import arch_of as prior_arch  # noqa: E402
from pipeline.device import native_cpu_bf16, use_bf16  # noqa: E402
from pipeline.training import build_optimizer, clip_gradients, cosine_with_warmup  # noqa: E402
from pipeline.upsampler.network import Upsampler  # noqa: E402
from pipeline.upsampler import stage as upsampler_stage  # noqa: E402
from pipeline.upsampler.stage import TrainingPairs, architecture, chain_sizes, conditioned, crop_size  # noqa: E402
from pipeline.workspace import atomic_write_json  # noqa: E402

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
PHASES = ("data", "forward", "backward", "clip+optimizer", "EMA")
QUICK_BATCH = 2


@dataclass
class Bench:
    """One model ready to train: the stage's model, loss, optimizer, scheduler, EMA and a batch source."""
    name: str
    batch: int                                   # the config's batch size
    precision: str                               # the config's precision setting ("auto", "bf16", "fp32")
    device: torch.device
    model: torch.nn.Module
    loss_fn: Callable                            # loss_fn(model, batch), the stage's own
    optimizer: torch.optim.Optimizer
    scheduler: object
    grad_clip: float
    batches: Callable[[int], Iterator]           # batches(batch_size) -> endless stream
    ema: Optional[object] = None                 # diffusers EMAModel (the diffusion models)
    after_step: Optional[Callable[[], None]] = None
    params: list = field(default_factory=list)

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()

    @property
    def bf16(self) -> bool:
        return use_bf16(self.precision, self.device)


# ---- synthetic inputs -------------------------------------------------------------------------

def images_u8(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, 3, size, size] noise (a convolution costs the same whatever the pixels)."""
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Unit-norm float32 [n, d], as CLIP's z_i and z_t."""
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)


def encodings(n: int, length: int, width: int, gen: torch.Generator,
              ends: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, L, W] float32, mask [n, L] bool): the embed stage's per-token text encodings,
    real tokens from position 0 to the end of text ``ends`` [n] (default: random, 3 .. L tokens),
    padding after."""
    tokens = torch.randn(n, length, width, generator=gen)
    if ends is None:
        ends = torch.randint(min(3, length), length + 1, (n,), generator=gen)
    return tokens, torch.arange(length)[None, :] < ends[:, None]


def caption_lengths(cfg, n: int, seed: int) -> torch.Tensor:
    """[n] token counts (start to end of text, at most the context) of n corpus captions: the prior
    cuts the padding away, so its work depends on them."""
    import open_clip
    length = cfg.clip.model.context_length
    tokens = open_clip.tokenize(corpus_captions(n, seed, cfg.corpus.two_object_fraction), context_length=length)
    return tokens.argmax(dim=-1) + 1


def captions(n: int, gen: torch.Generator) -> tuple[list[str], list[dict]]:
    """Corpus-like captions and their ground truth, one- and two-object scenes alternating."""
    pick = lambda xs: list(xs)[int(torch.randint(len(xs), (), generator=gen))]   # noqa: E731
    texts, gts = [], []
    for i in range(n):
        objs = [{"color": pick(COLORS), "shape": pick(SHAPES), "size": pick(SIZES), "position": pick(POSITIONS)}
                for _ in range(1 + i % 2)]
        gt = {"background": pick(BACKGROUNDS), "objects": objs}
        if len(objs) == 1:
            o = objs[0]
            texts.append(f"a {o['size']} {o['color']} {o['shape']} in the {o['position']}")
        else:
            gt["relation"] = pick(RELATIONS)
            a, b = objs
            texts.append(f"a {a['color']} {a['shape']} {gt['relation']} a {b['color']} {b['shape']}")
        gts.append(gt)
    return texts, gts


def corpus_captions(n: int, seed: int, two_object_fraction: float) -> list[str]:
    """n captions as the corpus writes them (pipeline/data/scenes.py: scenes and templates)."""
    return [caption(sample_scene(seed, i, two_object_fraction), np.random.default_rng([seed, i, 1]))
            for i in range(n)]


def draw(pool, batch_size: int, seed: int) -> Iterator:
    """Endless random batches from an in-memory pool (a dict or tuple of tensors with the sample
    first): one tensor index per field, as ``embeddings.train_batches`` draws them."""
    gen = torch.Generator().manual_seed(seed)
    n = len(next(iter(pool.values())) if isinstance(pool, dict) else pool[0])
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        yield {k: v[idx] for k, v in pool.items()} if isinstance(pool, dict) else tuple(v[idx] for v in pool)


# ---- the models, as their stages build them ------------------------------------------------------

def clip_bench(cfg, device: torch.device, pool_n: int, negatives: Optional[tuple[str, ...]] = None,
               name: str = "clip", trim: bool = True, used_rows: bool = True,
               share_prefix: Optional[bool] = None) -> Bench:
    """pipeline/clip/train.py: open_clip model, AdamW (open_clip's groups, fused), InfoNCE, the
    temperature clamp after every step: ``make_loss`` and ``clamp_temperature`` of the stage.
    ``negatives``: NegCLIP's hard negative kinds (default: the config's ``clip.hard_negatives``).
    The captions are the corpus's own (its templates and their lengths: the text tower's work
    depends on them since it encodes them without padding; ``trim=False`` encodes every caption
    at the full context length, as the stage did before). The token table is trained on the rows
    the pool's captions and negatives use, as the stage trains it (``clip/vocab.py``);
    ``used_rows=False`` trains the whole table, as the stage did before. ``share_prefix`` (default: the
    config's ``clip.shared_prefix``): each hard negative encoded from the first token it changes
    (``clip/shared_prefix.py``) or whole."""
    c = cfg.clip
    negatives = tuple(c.hard_negatives) if negatives is None else negatives
    torch.manual_seed(c.seed)
    clip = clip_model.build(c.model)
    model = clip.model.to(device)
    gen = torch.Generator().manual_seed(c.seed)
    texts = corpus_captions(pool_n, c.seed, cfg.corpus.two_object_fraction)
    pool = (images_u8(pool_n, c.model.image_size, gen), clip.tokenize(texts))
    if negatives:                           # as clip/data.py's batches: + tokens [n, K, L], mask [n, K]
        neg_texts, mask = hard_negatives(texts, negatives)
        pool += (clip.tokenize(neg_texts).view(pool_n, len(negatives), -1), mask)
    if used_rows:
        model.token_embedding = UsedRows(model.token_embedding, torch.unique(torch.cat([t.flatten() for t in pool[1:3]])))
    optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=True)
    scheduler = cosine_with_warmup(optimizer, c.warmup_steps, c.steps)
    return Bench(name, c.batch_size, c.precision, device, model, clip_train.make_loss(clip, c.precision, device, trim,
                                                                                share_prefix=c.shared_prefix if share_prefix is None
                                                                                else share_prefix),
                 optimizer, scheduler, c.grad_clip, lambda b: draw(pool, b, c.seed),
                 after_step=lambda: clip_train.clamp_temperature(model))


def judge_bench(cfg, pool_n: int, name: str = "judge") -> Bench:
    """pipeline/judge/stage.py: JudgeNet on the CPU (the stage never moves it), plain AdamW, the
    stage's own batch stream (degradations included) and loss. ``judge-nchw``: its body in the
    NCHW layout instead of channels-last (JudgeNet.embed before), to time the two side by side."""
    j = cfg.judge
    size = cfg.corpus.image_size
    torch.manual_seed(j.seed)
    net = JudgeNet(image_size=size, channels=list(j.channels), feature_dim=j.feature_dim)
    if name == "judge-nchw":
        net.embed = lambda x: net.features(net.body(torch.cat([x, net.coords.expand(len(x), -1, -1, -1).to(x.dtype)], 1)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=j.lr, weight_decay=j.weight_decay)
    scheduler = cosine_with_warmup(optimizer, j.warmup_steps, j.steps)
    gen = torch.Generator().manual_seed(j.seed)
    images = images_u8(pool_n, size, gen)
    targets = target_tensor(captions(pool_n, gen)[1])      # [n, heads], -1 where a head does not apply
    return Bench(name, j.batch_size, j.precision, torch.device("cpu"), net,
                 lambda m, b: judge_stage.loss_fn(m, b, j.precision), optimizer, scheduler, j.grad_clip,
                 lambda b: judge_stage.degraded(draw({"images": images, "targets": targets}, b, j.seed), j.seed,
                                                j.p_degrade))


def embedding_pool(cfg, n: int, image_size: Optional[int], seed: int) -> dict:
    """What ``train_batches`` yields: z_i, z_t [n, D], tokens [n, L, W], mask [n, L] (+ images)."""
    m = cfg.clip.model
    gen = torch.Generator().manual_seed(seed)
    tokens, mask = encodings(n, m.context_length, m.text_width, gen, caption_lengths(cfg, n, seed))
    pool = {"z_i": unit(n, m.embed_dim, gen), "z_t": unit(n, m.embed_dim, gen), "tokens": tokens, "mask": mask}
    return pool | ({"images": images_u8(n, image_size, gen)} if image_size else {})


def diffusion_bench(name: str, tc, model: torch.nn.Module, loss_fn, pool, device: torch.device) -> Bench:
    """The prior, decoder and upsamplers: ``train_diffusion_model``'s recipe (fused AdamW, warmup +
    cosine, EMA) from ``training.build_optimizer``, on the device accelerate would pick."""
    model.to(device)
    optimizer, scheduler, ema = build_optimizer(model, tc)
    return Bench(name, tc.batch_size, tc.precision, device, model, loss_fn, optimizer, scheduler, tc.grad_clip,
                 lambda b: draw(pool, b, tc.seed), ema=ema)


def prior_bench(cfg, device: torch.device, pool_n: int, name: str = "prior") -> Bench:
    """pipeline/prior/stage.py: ``arch_of`` + UnclipPrior, the stage's ``make_loss``. ``prior-sdpa``:
    the same with PyTorch's SDPA attention processor (diffusers' default) instead of the prior's
    written-out ``AttnProcessor`` with an fp32 softmax, to time the two side by side. ``prior-padded``:
    diffusers' forward over every token of the context (the prior's cuts the captions' padding)."""
    p, m = cfg.prior, cfg.clip.model
    torch.manual_seed(p.seed)
    model = UnclipPrior(**prior_arch(p, m.embed_dim, m.text_width, m.context_length))
    if name == "prior-sdpa":
        model.transformer.set_attn_processor(AttnProcessor2_0())
    if name == "prior-padded":
        model.length_groups = 0                   # diffusers' forward over every token, padding included
    schedule = noise_schedule(prior_diffusion.PREDICTION)

    return diffusion_bench(name, p, model, prior_stage.make_loss(p, schedule), embedding_pool(cfg, pool_n, None, p.seed), device)


def decoder_bench(cfg, device: torch.device, pool_n: int, name: str = "decoder", sets: tuple[str, ...] = ()) -> Bench:
    """pipeline/decoder/stage.py: ``arch_of`` + UnclipDecoder, the loss of ``training_fns``; ``sets``
    (``key=<json value>``, as a bench's ``--set``) replace keys of the decoder's config
    (``decoder+text-encoder``: ``text_layers=2``)."""
    d, m = config.with_overrides(cfg.decoder, list(sets), "decoder"), cfg.clip.model
    torch.manual_seed(d.seed)
    model = UnclipDecoder(**decoder_arch(d, m.embed_dim, m.text_width))
    _, loss_fn = training_fns(d, [])                        # the shard paths only feed make_batches
    return diffusion_bench(name, d, model, loss_fn, embedding_pool(cfg, pool_n, d.image_size, d.seed), device)


def upsampler_bench(cfg, key: str, device: torch.device, pool_n: int) -> Bench:
    """pipeline/upsampler/stage.py ``train``: Upsampler (given z_i when ``condition:
    image_embed``), crops of ``crop_size``, batches made by the stage's ``TrainingPairs`` from
    corpus-size images (with their z_i when conditioned), the stage's ``make_loss``."""
    u = cfg.upsample.stages[key]
    in_size, out_size = chain_sizes(cfg)[key]
    torch.manual_seed(u.seed)
    model = Upsampler(**architecture(u, cfg.clip.model.embed_dim))
    crop = crop_size(out_size, u.crop_fraction, model.multiple)
    schedule = diffusion.noise_schedule(u.prediction_type)

    gen = torch.Generator().manual_seed(u.seed)
    items = list(images_u8(pool_n, cfg.corpus.image_size, gen))           # uint8 [3, S, S] each
    if conditioned(u):
        items = list(zip(items, unit(pool_n, cfg.clip.model.embed_dim, gen)))
    # (x0 crops, conditioning crops) uint8 [n, 3, crop, crop] (+ z_i [n, D] when conditioned, + aug levels [n])
    pool = TrainingPairs(u.degradation, in_size, out_size, crop, u.seed, u.noise_aug, u.smooth_aug)(items)
    return diffusion_bench(f"upsample@{key}", u, model, upsampler_stage.make_loss(u, schedule), pool, device)


def build(cfg, names: list[str], device: torch.device, pool_n: Callable[[int], int]) -> list[Bench]:
    """The benches of ``names``; ``pool_n(config batch)`` samples in each one's pool."""
    makers = {"clip": lambda: clip_bench(cfg, device, pool_n(cfg.clip.batch_size)),
              "clip+negatives": lambda: clip_bench(cfg, device, pool_n(cfg.clip.batch_size), NEGATIVE_KINDS,
                                                   "clip+negatives"),
              "clip-negatives": lambda: clip_bench(cfg, device, pool_n(cfg.clip.batch_size), (), "clip-negatives"),
              "clip-full-table": lambda: clip_bench(cfg, device, pool_n(cfg.clip.batch_size), name="clip-full-table",
                                                    used_rows=False),
              "clip+negatives-shared": lambda: clip_bench(cfg, device, pool_n(cfg.clip.batch_size), NEGATIVE_KINDS,
                                                          "clip+negatives-shared", share_prefix=True),
              "clip+negatives-padded": lambda: clip_bench(cfg, device, pool_n(cfg.clip.batch_size), NEGATIVE_KINDS,
                                                          "clip+negatives-padded", trim=False),
              "judge": lambda: judge_bench(cfg, pool_n(cfg.judge.batch_size)),
              "judge-nchw": lambda: judge_bench(cfg, pool_n(cfg.judge.batch_size), "judge-nchw"),
              "prior": lambda: prior_bench(cfg, device, pool_n(cfg.prior.batch_size)),
              "prior-sdpa": lambda: prior_bench(cfg, device, pool_n(cfg.prior.batch_size), "prior-sdpa"),
              "prior-padded": lambda: prior_bench(cfg, device, pool_n(cfg.prior.batch_size), "prior-padded"),
              "decoder": lambda: decoder_bench(cfg, device, pool_n(cfg.decoder.batch_size)),
              "decoder+text-encoder": lambda: decoder_bench(cfg, device, pool_n(cfg.decoder.batch_size),
                                                            "decoder+text-encoder", ("text_layers=2",))}
    for key, u in cfg.upsample.stages.items():
        makers[f"upsample@{key}"] = lambda key=key, u=u: upsampler_bench(cfg, key, device, pool_n(u.batch_size))
    unknown = [n for n in names if n not in makers]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)} (known: {', '.join(makers)})")
    return [makers[n]() for n in names]


# ---- one step, FLOPs, timing -----------------------------------------------------------------

def add_setup_args(ap) -> None:
    """The options of the benches that build their models through :func:`build` (paired_steps.py,
    steady_steps.py): torch's threads, the params.yaml profile and file."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--params", default="params.yaml")


def setup(args) -> tuple:
    """:func:`add_setup_args`'s options applied: torch's threads set, (the config, the device accelerate would
    pick)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return (config.load(Path(args.params), args.profile),
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(b: Bench, it: Iterator) -> float:
    """One step of ``training.fit`` (single process: accelerate's backward and clipping are the
    plain ones), each phase under a profiler label. Returns the loss."""
    with record_function("data"):
        batch = next(it)
    with record_function("forward"):
        loss = b.loss_fn(b.model, batch)
        if not bool(torch.isfinite(loss.detach())):          # fit's guard (a device sync, as in fit)
            raise RuntimeError(f"{b.name}: non-finite loss {loss.item()}")
    with record_function("backward"):
        b.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("clip+optimizer"):
        norm = clip_gradients(b.params, b.grad_clip)              # fit's clipping
        bool(torch.isfinite(norm))                            # fit checks the norm too
        b.optimizer.step()
    if b.ema is not None:
        with record_function("EMA"):
            b.ema.step(b.params)
    with record_function("clip+optimizer"):                   # fit's bookkeeping after the update
        last = loss.item()
        b.scheduler.step()
        if b.after_step:
            b.after_step()
    return last


def count_flops(b: Bench, batch_size: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one step at ``batch_size``, by FlopCounterMode."""
    batch = next(b.batches(batch_size))
    with FlopCounterMode(display=False) as counter:
        loss = b.loss_fn(b.model, batch)
        forward = counter.get_total_flops()
        loss.backward()
    b.optimizer.zero_grad(set_to_none=True)
    return forward, counter.get_total_flops()


def timed_steps(b: Bench, it: Iterator, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    sync(b.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(b, it)
    sync(b.device)
    return (time.perf_counter() - t0) / steps


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    sync(a.device)
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    sync(a.device)
    return time.perf_counter() - t0


def peak_operands(device: torch.device, dtype: torch.dtype, n: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    return a, b, torch.empty(n, n, device=device, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else native_cpu_bf16()


def fixed_cost(points: dict[int, float]) -> tuple[float, float]:
    """Least squares s = a + b * batch over {batch: s/step} -> (a, b); a = 0 with one point."""
    xs, ys = list(points), list(points.values())
    if len(xs) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def sweep_sizes(batch: int, quick: bool) -> list[int]:
    """batch/4, batch/2, batch (distinct, at least 1); --quick: 1 and 2."""
    return [1, QUICK_BATCH] if quick else sorted({max(1, batch // 4), max(1, batch // 2), batch})


def measure(benches: list[Bench], peaks: dict, args) -> tuple[dict, dict]:
    """Round-robin timing: every (model, batch size) and the peak's matmuls take turns, --warmup
    steps each first, then --repeats rounds (the order rotating by one each round), each turn of a
    model --settle untimed steps and then --steps timed ones.
    Returns ({(name, batch): [s/step per repeat]}, {(device, dtype): [GFLOP/s per repeat]})."""
    jobs = [(b, n, b.batches(n)) for b in benches for n in sweep_sizes(b.batch, args.quick)]
    for b, _, it in jobs:
        for _ in range(args.warmup):
            train_step(b, it)
    for a, m, out in peaks.values():
        for _ in range(max(1, args.warmup)):
            torch.mm(a, m, out=out)
    step_times = {(b.name, n): [] for b, n, _ in jobs}
    peak_rates = {k: [] for k in peaks}
    turns = [("job", j) for j in jobs] + [("peak", k) for k in peaks]
    for r in range(args.repeats):
        for kind, what in turns[r % len(turns):] + turns[:r % len(turns)]:
            if kind == "peak":
                a, m, out = peaks[what]
                for _ in range(3):                           # three matmuls a turn: ~the length of a step
                    peak_rates[what].append(2 * a.shape[0] ** 3 / matmul_seconds(a, m, out) / 1e9)
            else:
                b, n, it = what
                for _ in range(args.settle):
                    train_step(b, it)
                step_times[(b.name, n)].append(timed_steps(b, it, args.steps))
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    return step_times, peak_rates


# ---- profile ---------------------------------------------------------------------------------

def profile_steps(b: Bench, steps: int, batch: int) -> dict:
    """torch.profiler over ``steps`` steps at ``batch``: ms per step of each phase and the top ops
    by self CPU time (the phases' own labels left out)."""
    it = b.batches(batch)
    train_step(b, it)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.type == "cuda" else [])
    sync(b.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(b, it)
        sync(b.device)
    events = prof.key_averages()
    phases = {}
    for e in events:
        if e.key in PHASES:
            phases[e.key] = {"cpu_ms": round(e.cpu_time_total / 1e3 / steps, 2)}
            if b.device.type == "cuda":
                phases[e.key]["device_ms"] = round(getattr(e, "device_time_total", 0) / 1e3 / steps, 2)
    ops = [e for e in events if e.key not in PHASES and not e.key.startswith("ProfilerStep")]
    total_self = sum(e.self_cpu_time_total for e in ops) or 1
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"model": b.name, "batch": batch, "steps": steps,
            "phases_ms": {p: phases[p] for p in PHASES if p in phases},
            "self_cpu_ms_per_step": round(total_self / 1e3 / steps, 2),
            "top_ops": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                         "self_cpu_ms": round(e.self_cpu_time_total / 1e3 / steps, 2),
                         "share_pct": round(100 * e.self_cpu_time_total / total_self, 1)} for e in top]}


# ---- the report ------------------------------------------------------------------------------

def cpu_info() -> dict:
    """CPU model and which of CPU_FLAGS /proc/cpuinfo lists (x86 ``flags``, Arm ``Features``)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def summarise(benches: list[Bench], flops: dict, step_times: dict, peak_rates: dict, args) -> dict:
    peak = {k: statistics.median(v) for k, v in peak_rates.items()}
    out = {}
    for b in benches:
        batch = QUICK_BATCH if args.quick else b.batch
        sweep = {n: statistics.median(step_times[(b.name, n)]) for n in sweep_sizes(b.batch, args.quick)}
        s = sweep[batch]
        fwd, total = flops[b.name]
        dtype = "bf16" if b.bf16 else "fp32"
        rate = total / s / 1e9
        a, slope = fixed_cost(sweep)
        out[b.name] = {"batch": batch, "config_batch": b.batch, "device": b.device.type, "precision": dtype,
                       "gflop_per_step": round(total / 1e9, 3), "gflop_forward": round(fwd / 1e9, 3),
                       "s_per_step": round(s, 5),
                       "s_per_step_repeats": [round(x, 5) for x in step_times[(b.name, batch)]],
                       "gflops": round(rate, 2), "peak_gflops": round(peak[(b.device.type, dtype)], 1),
                       "mfu_pct": round(100 * rate / peak[(b.device.type, dtype)], 2),
                       "sweep_s_per_step": {str(n): round(v, 5) for n, v in sweep.items()},
                       "fixed_s": round(a, 5), "per_sample_s": round(slope, 7),
                       "fixed_pct": round(100 * a / s, 1)}
    return out


def print_report(machine: dict, models: dict, prof: Optional[dict]) -> None:
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in machine["cpu"]["flags"].items())
    print(f"\nCPU: {machine['cpu']['model']}, {machine['threads']} torch threads; flags: {flags}")
    if machine.get("cuda"):
        print(f"GPU: {machine['cuda']}")
    for k, v in machine["peak_gflops"].items():
        print(f"matmul peak {k}: {v['median']:.1f} GFLOP/s (torch.mm {v['n']}x{v['n']}, median of {v['samples']})")
    head = ("model", "batch", "prec", "GFLOP/step", "s/step", "GFLOP/s", "% peak", "fixed s", "fixed %")
    rows = [(n, f["batch"], f["precision"], f"{f['gflop_per_step']:.2f}", f"{f['s_per_step']:.4f}",
             f"{f['gflops']:.1f}", f"{f['mfu_pct']:.1f}", f"{f['fixed_s']:.4f}", f"{f['fixed_pct']:.0f}")
            for n, f in models.items()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)           # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    print("\n" + line(head))
    for r in rows:
        print(line(r))
    print("\nbatch sweep (s/step): " + "; ".join(
        f"{n} " + ", ".join(f"{b}: {s:.4f}" for b, s in f["sweep_s_per_step"].items()) for n, f in models.items()))
    if prof:
        print(f"\nprofile: {prof['model']}, batch {prof['batch']}, {prof['steps']} steps; ms per step: "
              + ", ".join(f"{p} {v['cpu_ms']:.1f}" + (f" (device {v['device_ms']:.1f})" if "device_ms" in v else "")
                          for p, v in prof["phases_ms"].items())
              + f"; self CPU time of all ops {prof['self_cpu_ms_per_step']:.1f}")
        print(f"  {'op':<44} {'calls':>6} {'self ms':>8} {'share':>6}")
        for o in prof["top_ops"]:
            print(f"  {o['op'][:44]:<44} {o['calls_per_step']:>6} {o['self_cpu_ms']:>8.2f} {o['share_pct']:>5.1f}%")


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None,
                    help="comma list (default: all: clip,judge,prior,decoder,upsample@<key>...)")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per model and batch size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model and batch size first")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed block")
    ap.add_argument("--settle", type=int, default=1, help="untimed steps at the start of every block")
    ap.add_argument("--profile", default=None, help="params.yaml profile (default: UNCLIP_PROFILE or default)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile-model", default="decoder",
                    help="the model whose step torch.profiler breaks down ('' = none)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="batch 2 (sweep 1, 2), 1 repeat, 1 warm-up step, no settling, small matmuls")
    ap.add_argument("--out", default="reports/bench/train_throughput.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.steps, args.profile_steps, args.settle = 1, 1, 1, 2, 0
    cfg = config.load(Path(args.params), args.profile)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.models.split(",") if args.models else ["clip", "judge", "prior", "decoder",
                                                        *(f"upsample@{k}" for k in cfg.upsample.stages)]
    print(f"profile {cfg.profile}, models {', '.join(names)}, device {device}, {torch.get_num_threads()} threads"
          + (" (quick: the figures mean nothing)" if args.quick else ""), flush=True)

    # pools: twice the largest batch drawn, so batches differ from step to step
    benches = build(cfg, names, device, lambda batch: 2 * (QUICK_BATCH if args.quick else batch))
    flops = {b.name: count_flops(b, QUICK_BATCH if args.quick else b.batch) for b in benches}

    # the peak of every (device, precision) a model trains in (fp32 always, for reference)
    kinds = {(b.device.type, "bf16" if b.bf16 else "fp32") for b in benches} | {(b.device.type, "fp32") for b in benches}
    kinds |= {(dev, "bf16") for dev, _ in list(kinds) if native_bf16(torch.device(dev))}
    n_of = lambda dev: 256 if args.quick else (8192 if dev == "cuda" else 2048)     # noqa: E731
    peaks = {(dev, dt): peak_operands(torch.device(dev), torch.bfloat16 if dt == "bf16" else torch.float32, n_of(dev))
             for dev, dt in sorted(kinds)}
    step_times, peak_rates = measure(benches, peaks, args)
    models = summarise(benches, flops, step_times, peak_rates, args)

    target = next((b for b in benches if b.name == args.profile_model), None)
    prof = profile_steps(target, args.profile_steps, QUICK_BATCH if args.quick else target.batch) if target else None
    machine = {"cpu": cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "native_cpu_bf16": native_cpu_bf16(),
               "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "peak_gflops": {f"{dev} {dt}": {"median": round(statistics.median(peak_rates[(dev, dt)]), 1),
                                               "n": n_of(dev), "samples": len(peak_rates[(dev, dt)])}
                               for dev, dt in peaks}}
    print_report(machine, models, prof)
    report = {"machine": machine, "profile": cfg.profile, "quick": args.quick,
              "settings": {"repeats": args.repeats, "warmup": args.warmup, "steps": args.steps},
              "models": models, "step_profile": prof}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"\n-> {out}")
    return report


if __name__ == "__main__":
    main()

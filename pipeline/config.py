"""params.yaml -> typed, validated configuration.

The file has one section per stage plus ``profiles``; a profile's overrides are deep-merged over
the sections. Validation happens before any work starts: an unknown key or a bad value raises
:class:`ConfigError` whose message names the offending key (``clip.batch_size: ...``).

DVC sees the resolved configuration, not params.yaml and a profile name: :func:`write_resolved`
writes it to ``params.resolved.json`` in the workspace (the flow once per run, ``unclip stage``
before its stage, and dvc.yaml's ``config`` stage before any ``dvc repro``), and every stage
lists its sections of that file as its ``params``. A changed profile or parameter is then a
changed value there, and DVC alone decides which stages it makes stale.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .workspace import RESOLVED, atomic_write_bytes

PROFILE_ENV = "UNCLIP_PROFILE"
DEFAULT_PROFILE = "default"


class ConfigError(ValueError):
    """A params.yaml problem, phrased for the user (names the key)."""


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFractions(Section):
    val: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self):
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave something for train")
        return self


class CorpusConfig(Section):
    seed: int = 0
    n_scenes: int = Field(20000, ge=10)
    image_size: int = Field(64, ge=16, le=1024)
    render_scale: int = Field(4, ge=1, le=8)
    two_object_fraction: float = Field(0.4, ge=0, le=1)
    mismatch_fraction: float = Field(0.05, ge=0, lt=1)
    split: SplitFractions = SplitFractions()
    fault_fraction: float = Field(0.02, ge=0, lt=1)
    duplicate_fraction: float = Field(0.01, ge=0, lt=1)
    near_duplicate_fraction: float = Field(0.01, ge=0, lt=1)
    jpeg_quality: int = Field(95, ge=50, le=100)
    workers: int = Field(2, ge=1)
    # New data arriving: each entry appends a block of that many scenes (ids after the earlier
    # ones, their own duplicates and faults). Earlier blocks stay byte-identical, so appending an
    # entry is "new pairs in the source" and the next run crawls only their URLs.
    additions: list[int] = []

    @model_validator(mode="after")
    def _additions(self):
        if any(n < 1 for n in self.additions):
            raise ValueError("every entry of additions must be a scene count >= 1")
        return self


RGB = tuple[int, int, int]


class CrawlConfig(Section):
    url_list: Optional[str] = None
    # A list without a ``split`` column (or rows where it is empty) is split by a stable hash of
    # each row's key (its URL when the list has no key): these fractions go to val and test.
    split: SplitFractions = SplitFractions()
    # Transparent pixels (RGBA/LA/palette PNGs, WebP, GIF) are composited onto this RGB color.
    background: RGB = (255, 255, 255)
    processes: int = Field(2, ge=1)
    threads: int = Field(16, ge=1)
    shard_size: int = Field(2500, ge=1)
    timeout_s: float = Field(2.0, gt=0)          # each socket operation of a download (connect, a read)
    deadline_s: float = Field(30.0, gt=0)        # a whole URL: connect, redirects, headers and body
    max_bytes: int = Field(32 << 20, ge=1024, le=1 << 30)   # of one downloaded body; more is too_large
    retries: int = Field(0, ge=0)                # img2dataset's immediate retries of a failed download
    # A URL whose download failed transiently (timeout, 5xx, other) is fetched again by the next
    # crawl, until it has been tried this many times (crawl_log.parquet's ``attempts``).
    max_attempts: int = Field(3, ge=1)
    # Bounded: an image is decoded whole (up to 4 B/px, per download thread) once its header passed.
    max_image_area: int = Field(1048576, ge=1, le=1 << 26)
    min_image_size: int = Field(8, ge=1)
    # A user's list may name only public hosts (pipeline/data/fetch.py, SECURITY.md); true also
    # fetches from loopback and private networks (a list served from this machine or the LAN).
    allow_private_hosts: bool = False

    @model_validator(mode="after")
    def _deadline(self):
        if self.deadline_s < self.timeout_s:
            raise ValueError("deadline_s (a whole URL) must be >= timeout_s (one socket operation)")
        return self


class FilterConfig(Section):
    min_size: int = Field(32, ge=1)
    max_aspect_ratio: float = Field(2.0, ge=1)
    # An empty caption is always dropped (caption_empty); one word is a caption (real data sets
    # have many: "sunset", "logo"), so by default no word count is required beyond that.
    min_caption_words: int = Field(1, ge=0)
    max_caption_words: int = Field(40, ge=1)
    exact_dedup: bool = True
    near_dedup: bool = True
    phash_max_distance: int = Field(4, ge=0, le=64)
    thumb_max_cell_rmse: float = Field(3.25, ge=0)
    shard_size: int = Field(2500, ge=1)
    # A kept image that is not square is made square (the models see square images):
    # center_crop keeps the middle (the shorter side's square); pad extends the shorter side
    # with crawl.background, so nothing is cut off.
    square: Literal["center_crop", "pad"] = "center_crop"

    @model_validator(mode="after")
    def _caption_bounds(self):
        if self.min_caption_words > self.max_caption_words:
            raise ValueError("min_caption_words must be <= max_caption_words")
        return self


class ClipModelConfig(Section):
    """A small open_clip ViT; registered with open_clip under a generated name."""
    embed_dim: int = Field(128, ge=8)
    image_size: int = Field(64, ge=16)
    vision_layers: int = Field(3, ge=1)
    vision_width: int = Field(128, ge=16)
    vision_patch_size: int = Field(16, ge=1)
    vision_stem: Literal["conv", "patch"] = "conv"
    context_length: int = Field(24, ge=8, le=77)
    text_layers: int = Field(3, ge=1)
    text_width: int = Field(128, ge=16)
    text_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _divisible(self):
        if self.image_size % self.vision_patch_size:
            raise ValueError("image_size must be a multiple of vision_patch_size")
        if self.text_width % self.text_heads:
            raise ValueError("text_width must be a multiple of text_heads")
        return self


class ClipConfig(Section):
    pretrained: Optional[str] = None
    seed: int = 0
    model: ClipModelConfig = ClipModelConfig()
    batch_size: int = Field(256, ge=2)
    steps: int = Field(1800, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_batch_size: int = Field(512, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # NegCLIP hard negatives (pipeline/clip/negatives.py): extra image-to-text columns per caption
    hard_negatives: list[Literal["relation", "binding"]] = ["relation", "binding"]
    # the fraction of the steps trained before the hard negatives enter the loss (from step
    # ceil(fraction x steps)): those steps do not pay the text tower for the negatives' captions.
    # 0.22 saves 78 s of CLIP at one thread but cost the cascade about 5 points of relation in two
    # fresh runs (docs/MEASURED.md, seventeenth session), so the default keeps them from the first step
    hard_negatives_after: float = Field(0.0, ge=0, lt=1)
    # encode each hard negative from the first token it changes, on its caption's keys and values
    # (pipeline/clip/shared_prefix.py): the same function up to rounding, 1.02-1.05x CLIP's step in bf16
    # and 1.08x in fp32. Off: its rounding trains another CLIP than the one every earlier fresh run on
    # an AMX machine trained, and the two such CLIPs tried bound colors worse downstream (docs/MEASURED.md,
    # twenty-first session)
    shared_prefix: bool = False
    # language rewrites per training caption (pipeline/clip/rewrites.py, LaCLIP): each step trains on the
    # caption or one of its rewrites, drawn uniformly per sample. 0: the captions as they are
    rewrites: int = Field(3, ge=0, le=8)
    # the rewrites' pronoun frame puts its phrase before its object half the time ("a blue square and to the
    # left of it a red circle"): from the first step, at 1,800 steps it costs CLIP every relation, at 3,600 CLIP
    # learns the sentence (docs/MEASURED.md, 28th session); entering halfway (the next key), 1,800 steps learned it
    # on one CLIP draw of three (30th and 31st sessions): off by default
    rewrites_pronoun_first: bool = False
    # the fraction of the steps trained on the rewrites without it before they take it (from step
    # ceil(fraction x steps)): a text tower that has learned word order from the other frames learns the
    # pronoun's phrase before its object too, within the default's 1,800 steps (docs/MEASURED.md, 30th session)
    rewrites_pronoun_first_after: float = Field(0.5, ge=0, lt=1)
    # weight of a text-to-text term beside the image-text loss: each caption's z_t must pick the text the
    # step drew for it (the caption or a rewrite) among the batch's texts and that text's hard negatives,
    # and that text its caption among the batch's captions. The image-text loss pulls a rewrite's z_t toward
    # its image only; downstream, the prior reads z_t's place among the captions it trained on (a held-out
    # phrasing's z_t lay nearer its scene's caption than the reversed one 61-73 %: MEASURED, 29th session).
    # Costs the text tower one more caption per sample. At 1.0 it fits the trained phrasings and loses held-out
    # ones (29th session): 0, off
    rewrites_align: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        # clip.num_workers (DataLoader workers decoding CLIP's images) went when CLIP's batches moved
        # to a buffer of decoded shards in the training process (pipeline/clip/data.py): an older
        # params.yaml that still sets it is read without it.
        if isinstance(data, dict) and "num_workers" in data:
            data = {k: v for k, v in data.items() if k != "num_workers"}
        return data

    @model_validator(mode="after")
    def _align_needs_rewrites(self):
        if self.rewrites_align and not self.rewrites:
            raise ValueError("clip.rewrites_align aligns each caption's rewrites with it: set clip.rewrites above 0")
        return self

    @property
    def hard_negatives_from(self) -> int:
        """The first step whose loss has the hard negatives."""
        return math.ceil(self.hard_negatives_after * self.steps)

    @property
    def pronoun_first_from(self) -> int:
        """The first step whose batch draws the rewrites with the pronoun's phrase before its object (0: every
        step; ``steps``: none)."""
        return math.ceil(self.rewrites_pronoun_first_after * self.steps) if self.rewrites_pronoun_first else self.steps

    @property
    def pronoun_first_sets(self) -> tuple[bool, ...]:
        """The rewrite sets a run draws from: without (False) and/or with (True) the pronoun's phrase before its
        object. Both when that frame enters after the first step; the token rows CLIP trains cover them all."""
        first = self.pronoun_first_from
        return tuple(p for p, drawn in ((False, first > 0), (True, first < self.steps)) if drawn)


class EmbedConfig(Section):
    batch_size: int = Field(256, ge=1)
    min_similarity: Optional[float] = Field(0.55, ge=-1, le=1)
    shard_size: int = Field(2500, ge=1)
    num_workers: int = Field(0, ge=0)
    token_dtype: Literal["float16", "float32"] = "float16"
    # language rewrites of each train caption embedded beside it (CLIP's first ones, pipeline/clip/rewrites.py):
    # the prior and the decoder train on the caption or one of them, drawn per sample. 0: the captions only
    # (params.yaml says why that is the default)
    rewrites: int = Field(0, ge=0, le=8)


Sampler = Literal["ddpm", "ddim", "dpm++"]
Prediction = Literal["epsilon", "v_prediction"]
Precision = Literal["auto", "bf16", "fp32"]


class TrainConfig(Section):
    """What the three diffusion models' training shares (pipeline/training.py)."""
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    steps: int = Field(1000, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    checkpoint_every: int = Field(200, ge=1)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    num_workers: int = Field(1, ge=0)
    precision: Precision = "auto"


class SamplingConfig(Section):
    sampler: Sampler = "ddim"
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(1.0, ge=0)


class UpsamplerSamplingConfig(SamplingConfig):
    # The fraction of the noise schedule the sampler runs: 1 starts from pure noise, as the paper's
    # upsamplers sample; s < 1 starts from the bicubic upsample of the low-res image noised to
    # t = s T (SDEdit, Meng et al. 2022), so the few steps end at a lower noise level. 0.5 (a declared
    # deviation): 1.2-3.5 points of the cascade's shape on four fresh runs, a lower FD (docs/MEASURED.md, 23rd session)
    strength: float = Field(0.5, gt=0, le=1)
    # A network trained with noise_aug > 0: its low-res input is noised to this level first (8-bit
    # levels) and the network told so; 0 for one trained without
    aug_level: float = Field(0.0, ge=0)


class AutoregressivePriorConfig(Section):
    """The autoregressive prior's code (pipeline/prior/codebook.py) and sampling. DALL-E 2 keeps
    319 of 1024 PCA components and 1024 buckets each, on hundreds of millions of pairs."""
    components: int = Field(32, ge=1)                 # PCA components kept (of the embedding's width)
    buckets: int = Field(64, ge=2)                    # equal-mass buckets per component
    dot_buckets: int = Field(32, ge=2)                # buckets of z_i . z_t; sampling draws from the top half
    lr: float = Field(1e-3, gt=0)                     # in place of prior.lr (the diffusion prior's)
    guidance_scale: float = Field(2.0, ge=0)          # classifier-free guidance on the logits
    temperature: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _even_dot_buckets(self):
        if self.dot_buckets % 2:
            raise ValueError(f"dot_buckets must be even (its top half is sampled), got {self.dot_buckets}")
        return self


class PriorConfig(TrainConfig):
    # diffusion: DALL-E 2's diffusion prior (pipeline/prior/diffusion.py); autoregressive: its other
    # prior over quantized PCA codes of z_i (pipeline/prior/autoregressive.py, settings below)
    kind: Literal["diffusion", "autoregressive"] = "diffusion"
    autoregressive: AutoregressivePriorConfig = AutoregressivePriorConfig()
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=4)
    dropout: float = Field(0.0, ge=0, lt=1)
    p_uncond: float = Field(0.1, ge=0, le=1)          # text condition dropped (classifier-free guidance)
    batch_size: int = Field(256, ge=1)
    steps: int = Field(600, ge=1)
    weight_decay: float = Field(0.06, ge=0)
    num_workers: int = Field(0, ge=0)
    sampling: SamplingConfig = SamplingConfig(steps=4)
    n_candidates: int = Field(2, ge=1)                # DALL-E 2: draw 2, keep the larger z_i . z_t
    val_batch_size: int = Field(512, ge=1)


class DecoderConfig(TrainConfig):
    image_size: int = Field(16, ge=8)                 # the base resolution; the upsamplers take it from here
    block_out_channels: list[int] = [32, 64, 128]
    attention: list[bool] = [False, True, True]       # cross/self attention per resolution level
    # transformer: diffusers' Transformer2DModel (self-attention, cross-attention, feed-forward);
    # glide: GLIDE's block (the paper's decoder): self-attention whose keys/values also take the
    # projected context tokens, no feed-forward; self_cross / cross: the transformer block without its
    # feed-forward / cut to its cross-attention (pipeline/decoder/network.py)
    attention_block: Literal["transformer", "self_cross", "cross", "glide"] = "transformer"
    layers_per_block: int = Field(1, ge=1)
    head_dim: int = Field(32, ge=4)
    cross_attention_dim: int = Field(128, ge=8)
    extra_tokens: int = Field(4, ge=0)                # z_i projected into this many context tokens
    layout_channels: int = Field(8, ge=0)             # z_i + caption summary projected to a [C, S, S] input map
    layout_hidden: int = Field(0, ge=0)               # ...by a linear map (0) or an MLP with this many hidden units
    # > 0: the map's first 3 channels also regress the clean image (MSE, this weight beside the diffusion loss), so
    # "what goes where" is learned from z_i by direct supervision (pipeline/decoder/network.py); needs 3+ channels
    layout_weight: float = Field(0.0, ge=0)
    text_layers: int = Field(0, ge=0)                 # the decoder's own (GLIDE's) text encoder over the caption's tokens
    # GLIDE's AdaGN: the time + z_i embedding scales and shifts each ResNet block's second GroupNorm
    # (diffusers' resnet_time_scale_shift "scale_shift") instead of being added before it
    scale_shift_norm: bool = False
    learned_variance: bool = False                    # hybrid loss (Nichol & Dhariwal 2021); DDPM samples with it
    prediction_type: Prediction = "v_prediction"
    snr_gamma: Optional[float] = Field(None, gt=0)    # Min-SNR-gamma loss weighting; null = uniform (the default)
    sobolev_weight: float = Field(1.0, ge=0)          # + this x the error's finite differences squared (H1 loss)
    p_drop_image_embed: float = Field(0.1, ge=0, le=1)
    p_drop_caption: float = Field(0.2, ge=0, le=1)         # the paper's 0.5; params.yaml says why
    batch_size: int = Field(32, ge=1)
    steps: int = Field(4650, ge=1)
    lr: float = Field(1e-3, gt=0)
    num_workers: int = Field(0, ge=0)
    sampling: SamplingConfig = SamplingConfig(sampler="dpm++", steps=8, guidance_scale=2.0)

    @model_validator(mode="after")
    def _levels(self):
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError("attention needs one flag per entry of block_out_channels")
        if self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError("image_size must be divisible by 2^(levels - 1)")
        if self.layout_weight and self.layout_channels < 3:
            raise ValueError("layout_weight > 0 regresses the image into the layout map's first 3 channels: "
                             "layout_channels must be 3 or more")
        return self


class UpsamplerConfig(TrainConfig):
    scale: int = Field(2, ge=2, le=8)                 # output size = input size x scale
    degradation: Literal["blur", "bsr"] = "blur"      # corruption of the low-res input in training
    blur_sigma: tuple[float, float] = (0.4, 0.6)      # degradation blur: sigma ~ U[lo, hi] low-res px per image
    block_out_channels: list[int] = [32, 64, 128]
    layers_per_block: int = Field(1, ge=1)
    prediction_type: Prediction = "v_prediction"      # epsilon leaves noise after few steps from t = T
    crop_fraction: float = Field(0.5, gt=0, le=1)     # crop side / image side: 0.5 = 1/4 of the area
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    # Noise conditioning augmentation (Ho et al. 2021, CDM): the low-res input noised in training at
    # a level drawn uniformly from [0, noise_aug] 8-bit levels, which the network is told; sampling
    # noises the previous model's output to sampling.aug_level. 0: off (the paper's upsamplers)
    noise_aug: float = Field(0.0, ge=0, le=64)
    # Smooth-field augmentation (pipeline/upsampler/degrade.py): the low-res input in training also
    # gets a random field that varies over 1-3 low-res px, at up to this many 8-bit levels, not told
    # to the network: the low-frequency errors of a small base decoder's backgrounds. 0: off
    smooth_aug: float = Field(0.0, ge=0, le=64)
    sampling: UpsamplerSamplingConfig = UpsamplerSamplingConfig(steps=2)
    sobolev_weight: float = Field(0.0, ge=0)          # + this x the error's finite differences squared (H1 loss)
    # none: the paper's upsampler (the low-res image only). image_embed: also z_i, added to the
    # time embedding as the decoder does (a declared deviation: the low-res base drops shape)
    condition: Literal["none", "image_embed"] = "none"
    p_drop_image_embed: float = Field(0.1, ge=0, le=1)   # with condition image_embed: z_i zeroed this often
    # the shards it trains on, data/<images_from>, and so its stage's data dependency in dvc.yaml (which
    # reads this key from params.yaml itself): filtered, the filter stage's images, so that it can train
    # beside CLIP; embeddings, the embed stage's images with their z_i, which condition image_embed needs
    images_from: Literal["filtered", "embeddings"] = "filtered"
    # what is diffused: image (SR3: the high-res image) or residual (SRDiff, Li et al. 2022: the
    # high-res image minus the bicubic upsample of the low-res one; sampling adds it back)
    target: Literal["image", "residual"] = "residual"
    # with target residual: the residual is multiplied by this before it is diffused (and divided
    # after sampling), so that it has about the spread the noise schedule was made for, as latent
    # diffusion scales its latents to unit variance. Residuals are small (std 0.04-0.09 on the
    # embedded corpus against 0.7 for images): at scale 1 the network's error at the last sampling
    # step lands on the image as it is, at scale k it lands divided by k.
    residual_scale: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _embeddings_for_image_embed(self):
        if self.condition == "image_embed" and self.images_from != "embeddings":
            raise ValueError("condition image_embed trains on images with their z_i: set images_from: embeddings "
                             "(the embed stage's shards)")
        return self

    @field_validator("blur_sigma")
    @classmethod
    def _blur_range(cls, sigma):
        lo, hi = sigma
        if not 0 < lo <= hi <= 4:
            raise ValueError(f"blur_sigma must be [lo, hi] with 0 < lo <= hi <= 4 low-res px, not {list(sigma)}")
        return sigma

    @field_validator("sampling")
    @classmethod
    def _aug_level_within_noise_aug(cls, sampling, info):
        """Checked on ``sampling``, which is declared (so validated) after ``noise_aug``, so that
        the error names sampling's key."""
        noise_aug = info.data.get("noise_aug")
        if noise_aug is not None and sampling.aug_level > noise_aug:
            raise ValueError(f"aug_level {sampling.aug_level} is outside the levels the upsampler trains on "
                             f"(noise_aug {noise_aug}): set noise_aug at least as high")
        return sampling


class UpsampleConfig(Section):
    """The upsampler chain after the decoder; DVC stage ``upsample@<key>`` per entry, in order."""
    stages: dict[str, UpsamplerConfig] = {"1": UpsamplerConfig(steps=1000, noise_aug=32.0, smooth_aug=12.0),
                                          "2": UpsamplerConfig(block_out_channels=[16, 32, 64], batch_size=32,
                                                               steps=600, residual_scale=32.0)}


class EvaluateConfig(Section):
    seed: int = 0
    n_single: int = Field(256, ge=0)                  # held-out one-object captions (test split)
    n_pair: int = Field(256, ge=0)                    # held-out two-object captions; on data without
                                                      # ground truth: the first n_single + n_pair test captions
    batch_size: int = Field(32, ge=1)
    # DALL-E 2's ablation (section 5.1): the text-embedding and caption-only paths run on the first
    # this many one-object and as many two-object judged captions, and unCLIP's row is read on the same
    # ones (its judged figures stay on all n_single + n_pair); the rows' 20-point gaps need no more
    ablation_per_kind: int = Field(128, ge=1)
    # The grids' prompts; None: the embedded corpus's example prompts (evaluate.EXAMPLE_PROMPTS) on
    # data with ground truth, else the first 4 held-out test captions of the data.
    prompts: Optional[list[str]] = None
    grid_seeds: int = Field(4, ge=1)                  # samples per grid prompt
    # Standard FID/KID need Inception-v3's weights as a local file (torch-fidelity's
    # pt_inception-2015-12-05-6726825d.pth); unset, FD-CLIP/KD-CLIP in the pipeline's CLIP are reported.
    inception_weights: Optional[str] = None
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    n_worst: int = Field(16, ge=0)                    # worst-judged samples shown in the report
    # Diversity (pipeline/diversity.py): samples per caption for held-out captions, half one-object,
    # for unCLIP and the caption-only path, beside real renders of the same scenes; 0 prompts: none.
    diversity_prompts: int = Field(16, ge=0)
    diversity_seeds: int = Field(4, ge=2)             # at least a pair per caption
    # Captions a user would write (pipeline/phrasings.py): the first this many one-object and as many
    # two-object judged scenes rephrased outside the corpus's templates, each held-out family judged
    # beside unCLIP's row on the test split's captions of the same scenes; 0: none
    phrasings_per_kind: int = Field(128, ge=0)
    # DALL-E 2's comparison of priors (pipeline/prior_comparison.py): {name: a prior's model directory, relative
    # to the workspace}, each fed through the same cascade, captions and seeds as models/prior; {}: none
    # (bench/prior_comparison.py trains the other kind beside models/prior and fills this in)
    compare_priors: dict[str, str] = {}


class JudgeConfig(Section):
    """The ground-truth judge (pipeline/judge): a classifier trained on real corpus images."""
    seed: int = 0
    channels: list[int] = [32, 64, 96, 128]          # one stride-2 stage each: 64 px -> 4 px
    feature_dim: int = Field(256, ge=8)               # the features the Frechet distance is measured in
    batch_size: int = Field(128, ge=2)
    steps: int = Field(800, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    p_degrade: float = Field(0.5, ge=0, le=1)         # batches seen blurred/noised like generated images
    checkpoint_every: int = Field(200, ge=1)
    precision: Precision = "auto"


class RetrainConfig(Section):
    """What a rerun does with what the last run left (pipeline/data/incremental.py)."""
    incremental_data: bool = True                     # crawl new URLs only; filter/embed new shards only
    clip: Literal["keep", "retrain"] = "keep"         # keep: a CLIP of the same config stays frozen as data grows
    judge: Literal["keep", "retrain"] = "keep"        # the gate's yardstick: candidate and champion judged alike
    init_from: Literal["last", "scratch"] = "last"    # prior/decoder/upsamplers: continue from compatible weights
    finetune_fraction: float = Field(0.25, gt=0, le=1)   # of a stage's steps, when it continues


class TrackingConfig(Section):
    experiment: str = "unclip-pipeline"
    tracking_uri: Optional[str] = None


class GateRule(Section):
    """One figure of ``metrics/evaluate.json`` (a dotted key) that a candidate may not lose by
    more than ``tolerance`` (absolute, in the figure's units) against the champion."""
    metric: str
    higher_is_better: bool = True
    tolerance: float = Field(0.0, ge=0)


class PromoteConfig(Section):
    """The promotion gate after evaluate: the bundle is registered in MLflow's model registry and
    gets ``alias`` only if no rule finds it worse than the current holder of the alias."""
    enabled: bool = True
    registered_model: str = Field("unclip-pipeline", min_length=1)
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # a champion whose evaluate.json cannot be read: false keeps it (the candidate is refused);
    # true lets a candidate with finite figures replace it
    replace_unreadable: bool = False
    rules: list[GateRule] = [
        GateRule(metric="quality.single.color", tolerance=2.0),
        GateRule(metric="quality.single.shape", tolerance=2.0),
        GateRule(metric="quality.pair.colors", tolerance=2.0),
        GateRule(metric="quality.pair.relation", tolerance=2.0),
        GateRule(metric="quality.frechet_distance", higher_is_better=False, tolerance=25.0),
    ]
    # The rules for an evaluation of data without ground truth (a user's URL list), where the
    # judge's figures do not exist: the standard metrics and the CLIP score. The tolerance on
    # standard.fid suits FD-CLIP (values about 0.03 on the corpus); with Inception weights, FID points.
    rules_without_ground_truth: list[GateRule] = [
        GateRule(metric="standard.fid", higher_is_better=False, tolerance=0.02),
        GateRule(metric="clip_score_final", tolerance=1.0),
    ]


class SparkConfig(Section):
    """The Spark cluster the data stages use with ``cluster.engine: spark`` (pipeline/cluster.py)."""
    master: str = Field("local[2]", min_length=1)    # spark://host:7077 | yarn | k8s://https://... | local[N]
    # SparkSession.builder.config(key, value) for each entry (executor memory, retries, ...)
    conf: dict[str, str] = {"spark.executorEnv.OMP_NUM_THREADS": "1", "spark.task.maxFailures": "4",
                            "spark.ui.enabled": "false"}
    python: Optional[str] = None                      # PYSPARK_PYTHON on the executors; null: this interpreter
    task_gpus: float = Field(0, ge=0)                 # embed: spark.task.resource.gpu.amount (1 on GPU clusters)


class LauncherConfig(Section):
    """How the diffusion stages (prior, decoder, upsamplers) train: in this process (one CPU/GPU, or
    whatever `accelerate launch` / torchrun already started), or as ``nnodes`` x ``nproc_per_node``
    processes that this command starts with torchrun and c10d rendezvous (pipeline/launch.py)."""
    launcher: Literal["inprocess", "torchrun"] = "inprocess"
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)                   # this node's; env UNCLIP_NODE_RANK overrides per node
    rdzv_endpoint: Optional[str] = Field(None, pattern=r"^[^:\s]+:\d{1,5}$")   # host:port of the c10d store
    rdzv_id: str = Field("unclip", min_length=1)      # one job id shared by every node of a run
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = Field(1800, ge=10)               # collective timeout (slow first batches on big data)

    @model_validator(mode="after")
    def _rendezvous(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be < nnodes {self.nnodes}")
        if self.launcher == "torchrun" and self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("launcher torchrun with nnodes > 1 needs rdzv_endpoint (host:port reachable from every node)")
        return self


class ClusterConfig(Section):
    """Where the stages run, never what they compute: switching engine or launcher gives the same
    outputs (tests/test_cluster.py), so this section is in no stage's params in dvc.yaml and in no
    incremental recipe or saved model's config, and switching it invalidates nothing."""
    engine: Literal["local", "spark"] = "local"       # crawl, filter, embed: this process, or Spark tasks
    # null: the workspace. Else a root every node reads and writes (a shared mount, or an fsspec URL
    # such as s3://bucket/unclip): the data stages' shards go under it, each output folder keeping a
    # MANIFEST.json that DVC versions (pipeline/storage.py), and training checkpoints, so a restarted
    # node resumes.
    storage: Optional[str] = None
    groups_per_task: int = Field(1, ge=1)             # embed: shards per Spark task (disjoint groups)
    # the flow: independent stages (DVC's graph) run at once, at most this many, the cores shared
    # between them (pipeline/threads.py); 1 = one after another
    parallel_stages: int = Field(2, ge=1)
    spark: SparkConfig = SparkConfig()
    train: LauncherConfig = LauncherConfig()


class Config(Section):
    corpus: CorpusConfig = CorpusConfig()
    crawl: CrawlConfig = CrawlConfig()
    filter: FilterConfig = FilterConfig()
    clip: ClipConfig = ClipConfig()
    embed: EmbedConfig = EmbedConfig()
    prior: PriorConfig = PriorConfig()
    decoder: DecoderConfig = DecoderConfig()
    judge: JudgeConfig = JudgeConfig()
    upsample: UpsampleConfig = UpsampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    promote: PromoteConfig = PromoteConfig()
    retrain: RetrainConfig = RetrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    profile: str = DEFAULT_PROFILE

    @model_validator(mode="after")
    def _rewrites_embed_can_draw(self):
        # embed's rewrites are drawn from the frames without the pronoun's phrase first (False): the rewrite sets
        # CLIP draws lack them when that frame enters at step 0
        if self.embed.rewrites and False not in self.clip.pronoun_first_sets:
            raise ValueError("embed.rewrites draws the rewrites without clip.rewrites_pronoun_first's frame, which "
                             "CLIP never trains on with clip.rewrites_pronoun_first_after: 0: set embed.rewrites: 0 "
                             "or clip.rewrites_pronoun_first_after above 0")
        return self

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict (for MLflow params and saved run configs)."""
        return getattr(self, name).model_dump(mode="json")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def active_profile(explicit: str | None = None) -> str:
    return explicit or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        # a check across a section's keys names them in its message; the section itself is no help
        quiet = e["type"] == "extra_forbidden" or (e["type"] == "value_error" and isinstance(e.get("input"), dict))
        lines.append(f"  {key}: {msg}" + ("" if quiet else f" (got {e.get('input')!r})"))
    return "\n".join(lines)


def resolve(raw: dict, profile: str | None = None, source: str = "params.yaml") -> Config:
    """Merge the selected profile over the base sections and validate."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    name = active_profile(profile)
    if name not in profiles and name != DEFAULT_PROFILE:
        raise ConfigError(f"{source}: profile {name!r} is not defined under profiles "
                          f"(known: {', '.join(sorted(profiles)) or 'none'})")
    merged = deep_merge(raw, profiles.get(name) or {})
    merged["profile"] = name
    _check_chain(raw, merged, source, name)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        where = source if name == DEFAULT_PROFILE else f"{source} (profile {name!r})"
        raise ConfigError(_format_error(err, where)) from None


def _check_chain(raw: dict, merged: dict, source: str, profile: str) -> None:
    """A profile may change an upsampler but not add one, nor change the shards it trains on:
    dvc.yaml's stages upsample@<key> are the keys of params.yaml's own upsample.stages (its
    foreach), and each one's data dependency is its ``images_from`` there, whatever the profile.
    So params.yaml's own upsamplers must name it (DVC would stop on the missing key)."""
    def stages(sections):
        chain = sections.get("upsample")
        found = chain.get("stages") if isinstance(chain, dict) else None
        return found if isinstance(found, dict) else None
    where = f"{source}: profiles.{profile}"
    base, now = stages(raw), stages(merged)
    if base is not None and now is not None and set(now) != set(base):
        raise ConfigError(f"{where}.upsample.stages: a profile may not add upsamplers ({', '.join(sorted(set(now) - set(base)))}): "
                          f"the DVC stages upsample@<key> are the keys of params.yaml's upsample.stages")
    for key, item in (base or {}).items():
        if not isinstance(item, dict):
            continue                                 # pydantic names what is wrong with it
        if "images_from" not in item:
            raise ConfigError(f"{source}: upsample.stages.{key}.images_from is missing: dvc.yaml reads it from "
                              f"params.yaml for the stage's data (filtered, or embeddings with condition: image_embed)")
        mine = (now or {}).get(key)
        if isinstance(mine, dict) and mine.get("images_from") != item["images_from"]:
            raise ConfigError(f"{where}.upsample.stages.{key}.images_from: a profile may not change it: dvc.yaml's "
                              f"data dependency of upsample@{key} is params.yaml's own ({item['images_from']!r})")


def load(path: str | os.PathLike = "params.yaml", profile: str | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file (run inside a workspace, or pass --workspace)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return resolve(raw, profile, source=str(path))


def write_resolved(cfg: Config, root: str | os.PathLike) -> bool:
    """Write ``cfg`` (every key, defaults included) to the workspace's ``params.resolved.json``,
    atomically and only if its content changed, so DVC sees only real changes; True if written."""
    path = Path(root) / RESOLVED
    # raw UTF-8, not \u escapes: DVC reads the file with a YAML parser, which refuses the JSON
    # escapes of characters outside the BMP (surrogate pairs, e.g. an emoji in evaluate.prompts)
    text = json.dumps(cfg.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_bytes(path, text.encode())
    return True


def with_overrides(section, sets: list[str], where: str):
    """``section`` (a validated config model) with ``key=<json value>`` overrides (a bench's
    ``--set``), validated by the section itself. Raises ValueError with one line per problem,
    each named ``<where>.<key>``."""
    try:
        overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in sets)}
        return type(section).model_validate(section.model_dump() | overrides)
    except ValueError as err:                           # a malformed --set, bad JSON, or pydantic's verdict
        if hasattr(err, "errors"):
            why = "; ".join(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        else:
            why = f"{err} (expected key=<json value>)"
        raise ValueError(f"bad --set {sets}: {why}") from None

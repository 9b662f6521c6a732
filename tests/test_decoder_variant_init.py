"""bench/decoder_variant.py's mixed initialisation: named layers drawn from another seed, the rest untouched."""
from __future__ import annotations

import pytest
import torch

from helpers.bench import load_bench

ARCH = dict(image_size=8, embed_dim=8, text_width=8, block_out_channels=[32, 32], attention=[False, True],
            layers_per_block=1, head_dim=8, cross_attention_dim=16, extra_tokens=2, layout_channels=2)


def test_init_part_takes_the_named_layers_from_the_other_seed_only():
    bench = load_bench("decoder_variant")
    seed = {}
    for s in (0, 1):
        torch.manual_seed(s)
        seed[s] = bench.UnclipDecoder(**ARCH).state_dict()
    torch.manual_seed(1)
    model, parts = bench.initialise(ARCH, ["layout,unet.up_blocks=0"])
    after = torch.rand(1)                       # the donor's draw did not move the caller's generator
    torch.manual_seed(1)
    bench.UnclipDecoder(**ARCH)
    assert torch.equal(after, torch.rand(1))
    taken = [k for k in seed[0] if k.startswith(("layout", "unet.up_blocks"))]
    assert taken and parts["layout,unet.up_blocks"]["tensors"] == len(taken)
    for k, v in model.state_dict().items():
        want = seed[0][k] if k in taken else seed[1][k]
        assert torch.equal(v, want), k
    assert not torch.equal(seed[0]["layout.weight"], seed[1]["layout.weight"])   # the test can tell them apart
    with pytest.raises(ValueError, match="no parameter name starts with"):
        bench.initialise(ARCH, ["nonexistent=0"])

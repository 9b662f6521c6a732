"""pipeline/lean_unet.py: the decoder's UNet through fewer ops computes what diffusers' forward computes."""
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from pipeline import lean_unet
from pipeline.decoder.network import UnclipDecoder
from pipeline.device import autocast

B, D, W, L = 3, 16, 12, 7


def decoder(**kw):
    torch.manual_seed(0)
    args = dict(image_size=8, embed_dim=D, text_width=W, block_out_channels=[16, 32, 32],
                attention=[False, True, True], head_dim=8, cross_attention_dim=16, extra_tokens=2,
                layout_channels=2) | kw
    return UnclipDecoder(**args).train()


def batch(seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, size, size, generator=g)
    t = torch.tensor([3, 400, 999])
    z_i = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    tokens = torch.randn(B, L, W, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor([0, 3, 7])[:, None]       # one caption dropped
    return x, t, z_i, tokens, mask


def outputs_and_grads(m, lean: bool, inputs):
    m.lean = lean
    m.zero_grad(set_to_none=True)
    out = m(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_the_decoder_runs_the_lean_forward_for_transformer_blocks_only():
    assert decoder().lean
    assert not decoder(attention_block="glide").lean          # SimpleCrossAttn blocks: diffusers' forward
    m = decoder()
    m.unet.set_attn_processor(AttnProcessor())                 # not the processor the lean forward mirrors
    assert not lean_unet.supports(m.unet)
    assert not lean_unet.supports(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("block,kept,zeroed", [
    ("cross", {"norm2", "attn2"}, (".attn1.to_out.0.", ".ff.net.2.")),
    ("self_cross", {"norm1", "attn1", "norm2", "attn2"}, (".ff.net.2.",))])
def test_cut_blocks_are_the_transformer_block_without_those_modules(block, kept, zeroed):
    # the same seed draws the same weights for what both blocks have; zeroing the output maps of
    # the modules a block lacks leaves the transformer block computing the cut block's function
    cut, full = decoder(attention_block=block), decoder()
    assert cut.lean and cut.cut
    names = {n for n, _ in cut.named_parameters()}
    assert names < {n for n, _ in full.named_parameters()}
    blocks = [n.split(".transformer_blocks.0.")[1] for n in names if ".transformer_blocks.0." in n]
    assert {b.split(".")[0] for b in blocks} == kept
    with torch.no_grad():
        for n, p in full.named_parameters():
            if n in names:
                assert torch.equal(p, dict(cut.named_parameters())[n]), n
            elif any(z in n for z in zeroed):
                p.zero_()
    inputs = batch()
    out, grads = outputs_and_grads(cut, True, inputs)
    ref_out, ref_grads = outputs_and_grads(full, True, inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-9, msg=name)
    cut.lean = False                                      # diffusers' forward needs the modules it lacks
    with pytest.raises(ValueError, match="lean"):
        cut(*inputs)


@pytest.mark.parametrize("layers_per_block,scale_shift_norm", [(1, False), (2, False), (1, True)])
def test_lean_forward_equals_diffusers_outputs_and_gradients(layers_per_block, scale_shift_norm):
    m = decoder(layers_per_block=layers_per_block, scale_shift_norm=scale_shift_norm)
    assert m.lean and m.unet.config.resnet_time_scale_shift == ("scale_shift" if scale_shift_norm else "default")
    inputs = batch()
    ref_out, ref_grads = outputs_and_grads(m, False, inputs)
    out, grads = outputs_and_grads(m, True, inputs)
    assert out.shape == (B, 3, 8, 8)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(m.parameters()))
    for name, g in grads.items():        # fp32 summation order differs: tolerance on the tensor's scale
        ref = ref_grads[name]
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-9, msg=name)


def test_lean_forward_keeps_the_mask_and_the_dropped_caption():
    m = decoder().eval()
    x, t, z_i, tokens, mask = batch()
    with torch.no_grad():
        out = m(x, t, z_i, tokens, mask)
        changed = tokens.clone()
        changed[1, 3:] = 50.0            # tokens the mask hides: nothing moves
        changed[0] = -50.0               # the dropped caption: nothing moves
        torch.testing.assert_close(m(x, t, z_i, changed, mask), out, rtol=1e-5, atol=1e-5)
        changed[2, 0] = 50.0             # a token that is attended to: the output moves
        assert not torch.allclose(m(x, t, z_i, changed, mask)[2], out[2], atol=1e-3)


def test_lean_forward_under_bf16_autocast_is_diffusers_within_bf16_rounding():
    m = decoder().eval()
    inputs = batch(size=8)
    with torch.no_grad():
        exact = m(*inputs)
        err = {}
        for lean in (False, True):
            m.lean = lean
            with autocast("bf16", torch.device("cpu")):
                got = m(*inputs).float()
            err[lean] = (got - exact).square().mean().sqrt() / exact.square().mean().sqrt()
    # the lean forward rounds differently (q's scale folded into its weights, an fp32 softmax),
    # not more: within 2x of diffusers' own bf16 error, and both within a few per cent
    assert err[True] < 0.03 and err[False] < 0.03
    assert err[True] < 2 * err[False] + 1e-3

"""NegCLIP's hard negatives (pipeline/clip/negatives.py), its loss, and the pair zero-shot figures."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers.numerics import reorder_atol
from open_clip.loss import ClipLoss

from pipeline.clip.negatives import hard_negatives, reverse_relation, swap_colors
from pipeline.clip.train import negclip_loss
from pipeline.clip.zeroshot import pair_candidates, pair_verdicts


def test_relation_reversed_word_by_word():
    assert reverse_relation("a red circle to the left of a blue square") == "a red circle to the right of a blue square"
    assert reverse_relation("a red circle above a blue square") == "a red circle below a blue square"
    assert reverse_relation("Top-left corner: a small red circle") == "Bottom-right corner: a small red circle"
    assert reverse_relation("at the upper left") == "at the lower right"
    assert reverse_relation("a red circle in the center") is None
    assert reverse_relation("a bright star") is None                # "bright" holds "right", not the word


def test_colors_swapped_between_the_first_two_color_words():
    assert swap_colors("a red circle to the left of a blue square") == "a blue circle to the left of a red square"
    assert swap_colors("a photo of a small Red circle on a white background") == \
        "a photo of a small white circle on a Red background"
    assert swap_colors("a red circle and a red square") is None       # one color: nothing to swap
    assert swap_colors("a reddish circle") is None


def test_hard_negatives_mask_what_does_not_apply():
    texts, mask = hard_negatives(["a red circle above a blue square", "a green triangle"], ("relation", "binding"))
    assert mask.tolist() == [[True, True], [False, False]]
    assert texts[:2] == ["a red circle below a blue square", "a blue circle above a red square"]
    assert texts[2:] == ["a green triangle", "a green triangle"]    # placeholders, masked out of the loss


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_negclip_loss_without_negatives_is_clip_loss():
    torch.manual_seed(0)
    z_i, z_t, scale = _unit(6, 8), _unit(6, 8), torch.tensor(10.0)
    ours = negclip_loss(z_i, z_t, torch.zeros(0, 8), scale)
    assert torch.allclose(ours, ClipLoss()(z_i, z_t, scale), atol=1e-6)


def test_negclip_loss_counts_hard_negatives_in_image_to_text_only():
    torch.manual_seed(0)
    z_i = _unit(4, 8)
    z_t = z_i.clone()
    scale = torch.tensor(10.0)
    far, close = -z_i[:1], z_i[:1].clone()                        # a negative far from image 0, or equal to it
    assert negclip_loss(z_i, z_t, close, scale) > negclip_loss(z_i, z_t, far, scale)
    target = torch.arange(4)
    text_to_image = F.cross_entropy(scale * z_t @ z_i.T, target)   # no negative columns on this side
    image_to_text = F.cross_entropy(scale * z_i @ torch.cat([z_t, close]).T, target)
    assert torch.allclose(negclip_loss(z_i, z_t, close, scale), (image_to_text + text_to_image) / 2, atol=1e-6)


class StubClip(torch.nn.Module):
    """What ``make_loss`` calls on a CLIP: unit embeddings from the inputs' first values; every
    batch of texts it encodes is kept in ``seen``."""
    logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def __init__(self):
        super().__init__()
        self.seen = []

    def encode_image(self, x, normalize):
        return F.normalize(x.flatten(1)[:, :4].float() + 1, dim=-1)

    def encode_text(self, t, normalize):
        self.seen.append(t.clone())
        return F.normalize(t[:, :4].float() + 1, dim=-1)


def tokenize(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[hash(x) % 97 + i for i in range(6)] for x in captions])


def stub_loss(**kw):
    from types import SimpleNamespace

    from pipeline.clip.train import make_loss
    return make_loss(SimpleNamespace(preprocess=lambda x: x), "fp32", torch.device("cpu"), **kw)


def test_the_loss_encodes_only_the_negatives_that_exist():
    captions = ["a red circle above a blue square", "a green triangle"]
    texts, mask = hard_negatives(captions, ("relation", "binding"))
    images = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    model = StubClip()
    stub_loss()(model, (images, tokenize(captions), tokenize(texts).view(2, 2, -1), mask))
    assert model.seen[0].shape[0] == 2 + 2                         # the pair's two negatives; the single has none
    assert torch.equal(model.seen[0][2:], tokenize(texts[:2]))


def test_the_negatives_enter_the_loss_at_their_step():
    """``clip.hard_negatives_after``: before its step the loss is open_clip's InfoNCE and the
    negatives' captions are not encoded; from it on, NegCLIP's loss."""
    captions = ["a red circle above a blue square", "a green triangle below a red circle"]
    texts, mask = hard_negatives(captions, ("relation", "binding"))
    images = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    batch = (images, tokenize(captions), tokenize(texts).view(2, 2, -1), mask)
    done = [0]
    loss_fn = stub_loss(negatives_from=3, steps_done=lambda: done[0])
    model = StubClip()
    z_i = model.encode_image(images, True)
    z_t = model.encode_text(tokenize(captions), True)
    z_neg = model.encode_text(tokenize(texts), True)
    model.seen.clear()
    done[0] = 2
    assert torch.allclose(loss_fn(model, batch), ClipLoss()(z_i, z_t, model.logit_scale.exp()))
    done[0] = 3
    assert torch.allclose(loss_fn(model, batch), negclip_loss(z_i, z_t, z_neg, model.logit_scale.exp()))
    assert [len(t) for t in model.seen] == [2, 2 + 4]              # the captions alone, then with their negatives


def test_pair_candidates_differ_in_one_thing_each():
    gt = {"relation": "left of", "objects": [{"color": "red", "shape": "circle"}, {"color": "orange", "shape": "square"}]}
    c = pair_candidates(gt)
    assert c[:3] == ["a red circle to the left of an orange square", "an orange circle to the left of a red square",
                     "a red circle to the right of an orange square"]
    assert len(c) == 3 + 2 * 6 and len(set(c)) == len(c)
    z = torch.eye(len(c))
    v = pair_verdicts(z[:1], z[None])                              # the true caption is the closest
    assert v == {"colors": [True], "binding": [True], "relation": [True], "all": [True]}
    v = pair_verdicts(z[2:3], z[None])                             # closest to the reversed relation
    assert v["relation"] == [False] and v["binding"] == [False]


def test_text_embeddings_without_padding_are_the_full_encoding(smoke_cfg):
    """The trimmed text tower (sorted by length, each group cut to its longest caption) gives
    open_clip's z_t and the same gradients: the causal mask keeps padding out of every real token."""
    from pipeline.clip import model as clip_model
    torch.manual_seed(0)
    clip = clip_model.build(smoke_cfg.clip.model)
    captions = ["a red circle", "a photo of a small red circle to the left of a blue square on a white background",
                "top-left corner: a large yellow square", "a cyan triangle below a tiny orange circle", "circle"]
    tokens = clip.tokenize(captions)
    model = clip.model.float()
    full = model.encode_text(tokens, normalize=True)
    full.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.encode_text = None                     # the trimmed path must not fall back to the full one
    for groups in (1, 2, 3, 5, 9):
        trimmed = clip_model.text_embeddings(model, tokens, groups)
        assert torch.allclose(trimmed, full, atol=1e-5), groups
    clip_model.text_embeddings(model, tokens).sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_negatives_from_their_first_changed_token_are_the_full_encoding(smoke_cfg):
    """clip/shared_prefix.py: each hard negative encoded from the first token it changes, on its
    caption's keys and values before it, gives open_clip's z_t of the negative encoded whole, and
    the same gradients, for negatives that change their first word, a late one, or their length."""
    from pipeline.clip import model as clip_model
    from pipeline.clip.negatives import hard_negatives
    from pipeline.clip.shared_prefix import is_causal_argmax, text_embeddings_with_negatives
    torch.manual_seed(0)
    clip = clip_model.build(smoke_cfg.clip.model)
    model = clip.model.float()
    assert is_causal_argmax(model)
    captions = ["a red circle to the left of a blue square", "red square above a green circle",
                "a photo of a small red circle at the top left on a white background", "a circle",
                "a large yellow square below a tiny orange circle"]
    texts, mask = hard_negatives(captions, ("relation", "binding"))
    tokens = clip.tokenize(captions)
    negatives = clip.tokenize(texts).view(len(captions), 2, -1)[mask]
    extra = clip.tokenize(["a red circle to the left of a big blue square", "a"])   # longer; cut short
    negatives, source = torch.cat([negatives, extra]), torch.cat([mask.nonzero()[:, 0], torch.tensor([0, 3])])
    assert len(negatives) == 10
    w = torch.randn(len(captions) + len(negatives), model.text_projection.shape[1])

    def loss(z):
        return (z * w).sum()
    whole = model.encode_text(torch.cat([tokens, negatives]), normalize=True)
    loss(whole).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    z_t, z_neg = text_embeddings_with_negatives(model, tokens, negatives, source)
    assert torch.allclose(torch.cat([z_t, z_neg]), whole, atol=1e-5)
    loss(torch.cat([z_t, z_neg])).backward()
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            atol = reorder_atol(grads[n], 1e-5)    # fp32 sums in another order: grows with the gradient's scale
            assert torch.allclose(p.grad, grads[n], atol=atol), (n, (p.grad - grads[n]).abs().max().item(), atol)
    # no negatives at all: the captions alone
    z_t, z_neg = text_embeddings_with_negatives(model, tokens, negatives[:0], source[:0])
    assert z_neg.shape == (0, z_t.shape[1]) and torch.allclose(z_t, whole[:len(captions)], atol=1e-5)


def test_the_training_loss_is_the_same_with_negatives_encoded_whole(smoke_cfg):
    """make_loss with share_prefix (``clip.shared_prefix``) and without: the same NegCLIP loss and gradients."""
    from pipeline.clip import model as clip_model
    from pipeline.clip import train as clip_train
    from pipeline.clip.negatives import hard_negatives
    torch.manual_seed(0)
    clip = clip_model.build(smoke_cfg.clip.model)
    model = clip.model.float()
    captions = ["a red circle to the left of a blue square", "a green square", "a yellow circle above a red square"]
    texts, mask = hard_negatives(captions, ("relation", "binding"))
    s = clip.image_size
    batch = (torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8), clip.tokenize(captions),
             clip.tokenize(texts).view(3, 2, -1), mask)
    out = []
    for share in (True, False):
        model.zero_grad()
        loss = clip_train.make_loss(clip, "fp32", torch.device("cpu"), share_prefix=share)(model, batch)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    for n, g in out[1][1].items():
        assert torch.allclose(out[0][1][n], g, atol=1e-5), n


def test_rewrites_align_adds_the_text_to_text_negclip_term(smoke_cfg):
    """``clip.rewrites_align``: the batch ends with the captions' tokens, and the loss is the image-text NegCLIP loss
    + align x the same loss with the captions' z_t in the images' place (the drawn texts and their negatives as
    its columns); its gradient reaches the text tower only."""
    from pipeline.clip import model as clip_model
    from pipeline.clip import train as clip_train
    from pipeline.clip.model import text_embeddings
    torch.manual_seed(0)
    clip = clip_model.build(smoke_cfg.clip.model)
    model = clip.model.float()
    captions = ["a red circle to the left of a blue square", "a green square", "a yellow circle above a red square"]
    drawn = ["on the left is a red circle and on the right is a blue square", "a green square",
             "a red square below a yellow circle"]                   # each caption or one of its rewrites
    texts, mask = hard_negatives(drawn, ("relation", "binding"))
    s = clip.image_size
    batch = (torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8), clip.tokenize(drawn),
             clip.tokenize(texts).view(3, 2, -1), mask)
    cpu = torch.device("cpu")
    base = clip_train.make_loss(clip, "fp32", cpu)(model, batch)
    aligned = clip_train.make_loss(clip, "fp32", cpu, align=0.5)(model, (*batch, clip.tokenize(captions)))
    with torch.no_grad():
        z_c = text_embeddings(model, clip.tokenize(captions))
        z_t = text_embeddings(model, clip.tokenize(drawn))
        z_neg = text_embeddings(model, clip.tokenize(texts).view(3, 2, -1)[mask])
    term = negclip_loss(z_c, z_t, z_neg, model.logit_scale.exp())
    assert torch.allclose(aligned, base + 0.5 * term, atol=1e-5) and term > 0
    model.zero_grad()
    (aligned - base).backward()                                       # the term alone
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and not any(n.startswith("visual.") for n in grads)

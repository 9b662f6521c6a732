"""CLIP trains the rows of its token table that its captions use (pipeline/clip/vocab.py): the
same weights as training the whole table, and every id of the training data has its row."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.clip import model as clip_model
from pipeline.clip.negatives import hard_negatives
from pipeline.clip.train import clamp_temperature, make_loss, param_groups
from pipeline.clip.vocab import UsedRows, decay_over, used_token_ids
from pipeline.data.shards import ShardSink
from pipeline.training import clip_gradients, cosine_with_warmup

CAPTIONS = ["a red circle to the left of a blue square", "a small green triangle",
            "a large yellow square above a cyan circle on a white background", "an orange circle"]


def batch_ids(batches) -> torch.Tensor:
    """Every token id of ``batches``' captions and negatives, sorted."""
    return torch.unique(torch.cat([b[1].flatten() for b in batches] + [b[2].flatten() for b in batches]))


def train(cfg, batches, used: bool, steps: int):
    """``steps`` of the CLIP stage's update (fp32) on ``batches``; the whole table or its used rows."""
    torch.manual_seed(0)
    clip = clip_model.build(cfg.model)
    model = clip.model.float()
    table = model.token_embedding
    if used:
        model.token_embedding = UsedRows(table, batch_ids(batches))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, fused=True)
    scheduler = cosine_with_warmup(optimizer, 2, steps)
    loss_fn = make_loss(clip, "fp32", torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batches[step % len(batches)]).backward()
        clip_gradients(params, 1.0)
        optimizer.step()
        scheduler.step()
        clamp_temperature(model)
    if used:
        model.token_embedding = model.token_embedding.restore(
            table, decay_over(optimizer, scheduler, model.token_embedding.weight, steps))
    return model, table


def test_used_rows_train_the_weights_of_the_whole_table(smoke_cfg):
    cfg = smoke_cfg.clip
    clip = clip_model.build(cfg.model)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(3):
        captions = [CAPTIONS[(i + k) % len(CAPTIONS)] for k in range(4)]
        negatives, mask = hard_negatives(captions, ("relation", "binding"))
        images = torch.randint(0, 256, (4, 3, cfg.model.image_size, cfg.model.image_size), dtype=torch.uint8,
                               generator=gen)
        batches.append((images, clip.tokenize(captions), clip.tokenize(negatives).view(4, 2, -1), mask))
    whole, whole_table = train(cfg, batches, used=False, steps=6)
    used, used_table = train(cfg, batches, used=True, steps=6)
    assert isinstance(used.token_embedding, torch.nn.Embedding) and used.token_embedding is used_table
    trained = whole.state_dict()
    for name, value in used.state_dict().items():
        assert torch.allclose(value, trained[name], rtol=1e-5, atol=1e-6), name
    torch.manual_seed(0)
    init = clip_model.build(cfg.model).model.token_embedding.weight.detach()
    unused = torch.ones(len(init), dtype=torch.bool)
    unused[batch_ids(batches)] = False
    ratio = whole_table.weight.detach()[unused] / init[unused]      # AdamW only decayed the rows no caption uses
    assert 0.9 < float(ratio.min()) and float(ratio.max()) < 1 - 1e-4
    assert float(ratio.max() - ratio.min()) < 1e-5


def test_used_token_ids_include_the_negatives_words(tmp_path, smoke_cfg):
    """A relation reversed can hold a word that no caption has ("right" below); test captions are left out."""
    clip = clip_model.build(smoke_cfg.clip.model)
    with ShardSink(tmp_path, shard_size=2) as sink:
        for i, (caption, split) in enumerate([("a red circle to the left of a blue square", "train"),
                                              ("a green triangle", "train"),
                                              ("a purple hexagon", "test")]):
            sink.write({"__key__": f"{i:04d}", "txt": caption, "json": json.dumps({"split": split})})
    paths = sorted(tmp_path.glob("*.tar"))
    ids = set(used_token_ids(paths, clip.tokenize, ("relation", "binding")).tolist())
    plain = set(used_token_ids(paths, clip.tokenize).tolist())
    words = lambda text: set(clip.tokenize([text])[0].tolist())          # noqa: E731
    assert words("a red circle to the left of a blue square") | words("a green triangle") == plain
    assert words("right") <= ids and not words("right") <= plain
    assert not words("purple hexagon") <= ids
    found = used_token_ids(paths, clip.tokenize)
    assert torch.equal(found, found.sort().values) and int(found[0]) == 0          # sorted, padding included


def test_a_token_outside_the_used_rows_is_a_clear_error(smoke_cfg):
    table = torch.nn.Embedding(100, 4)
    rows = UsedRows(table, torch.tensor([0, 3, 7]))
    assert torch.equal(rows(torch.tensor([[3, 7, 0]])), table.weight[[3, 7, 0]].unsqueeze(0))
    with pytest.raises(ValueError, match=r"token ids \[5\]"):
        rows(torch.tensor([[3, 5]]))


def test_the_stage_trains_the_clip_of_the_whole_table(data_ws, smoke_cfg, tmp_path, monkeypatch):
    """clip/train.py on the smoke shards: with the rows picked (the default) and with the pre-pass
    refused (shards over PREPASS_BYTES: the whole table trains), the same weights up to rounding."""
    from pipeline.clip import vocab
    from pipeline.clip.train import train as train_clip
    from pipeline.data.shards import shard_paths
    cfg = smoke_cfg.clip.model_copy(update={"precision": "fp32"})
    paths = shard_paths(data_ws.filtered)
    used, used_summary = train_clip(cfg, paths, tmp_path / "used")
    monkeypatch.setattr(vocab, "PREPASS_BYTES", 0)
    assert vocab.used_token_ids(paths, used.tokenize) is None
    whole, whole_summary = train_clip(cfg, paths, tmp_path / "whole")
    assert whole_summary["token_rows"] == whole.model.token_embedding.num_embeddings > used_summary["token_rows"] > 10
    assert isinstance(used.model.token_embedding, torch.nn.Embedding)
    trained = whole.model.state_dict()
    for name, value in used.model.state_dict().items():
        assert torch.allclose(value, trained[name], rtol=1e-5, atol=1e-6), name

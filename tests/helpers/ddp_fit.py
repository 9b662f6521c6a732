"""Run the shared training loop in one of several processes (launched by torchrun in
tests/test_training.py): a linear regression, per-process data, EMA, checkpoints."""
import json
import sys
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from pipeline.training import Checkpointer, cosine_with_warmup, fit, make_accelerator

out = Path(sys.argv[1])
steps = int(sys.argv[2])
acc = make_accelerator()
torch.manual_seed(0)                                   # the same init on every process
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
ema = EMAModel(model.parameters(), decay=0.9)
g = torch.Generator().manual_seed(100 + acc.process_index)   # disjoint data per process


def batches():
    while True:
        x = torch.randn(16, 4, generator=g)
        yield x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


summary = fit(model, opt, cosine_with_warmup(opt, 2, steps), batches(), loss_fn, steps=steps,
              checkpointer=Checkpointer(out / "ckpt", "ddp", every=5), ema=ema, accelerator=acc, log_every=5)
(out / f"rank{acc.process_index}.json").write_text(json.dumps({
    "summary": summary, "weight": model.weight.detach().tolist(), "world": acc.num_processes}))

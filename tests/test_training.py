"""The shared training loop: checkpoints, resume to the same step count, non-finite guard."""
import pytest
import torch

from pipeline.training import Checkpointer, NonFiniteLoss, cosine_with_warmup, fit


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, cosine_with_warmup(opt, 2, 10)


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, x.sum(-1, keepdim=True)


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


class Killed(Exception):
    pass


def test_killed_run_resumes_and_ends_at_the_same_step(tmp_path):
    model, opt, sched = setup()
    ckpt = Checkpointer(tmp_path, "k", every=3)

    def die_at_7(step):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        fit(model, opt, sched, batches(), mse, steps=10, checkpointer=ckpt, after_step=die_at_7)
    assert ckpt.path.exists()
    model2, opt2, sched2 = setup(seed=1)                    # a fresh process: other init
    summary = fit(model2, opt2, sched2, batches(), mse, steps=10, checkpointer=ckpt)
    assert summary["resumed_from"] == 6 and summary["steps"] == 10
    assert sched2.last_epoch == 10                           # the lr schedule resumed too


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    model, opt, sched = setup()
    Checkpointer(tmp_path, "old", every=1).save(5, model, opt, sched)
    summary = fit(model, opt, sched, batches(), mse, steps=3, checkpointer=Checkpointer(tmp_path, "new", every=1))
    assert summary["resumed_from"] == 0


def test_non_finite_loss_stops_the_run(tmp_path):
    model, opt, sched = setup()

    def nan_loss(model, batch):
        return mse(model, batch) * float("nan")

    with pytest.raises(NonFiniteLoss, match="loss is nan at step 0"):
        fit(model, opt, sched, batches(), nan_loss, steps=3)

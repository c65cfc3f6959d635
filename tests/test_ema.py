"""The EMA teacher: the numbers of PyTorch's AveragedModel (EMA, buffers too), without its per-step host copy."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mitoseg.engine.ema import ModelEMA


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_model_ema_equals_averaged_model_over_training_steps():
    model = small_model()
    ours = ModelEMA(model, decay=0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(2, 1, 8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model)
        reference.update_parameters(model)
    for (name, a), b in zip(ours.module.state_dict().items(), reference.module.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert ours.n_averaged == int(reference.n_averaged) == 4
    # The teacher moved away from the student (decay 0.9), and integer buffers follow the student.
    assert not torch.equal(ours.module[0].weight, model[0].weight)
    assert ours.module[1].num_batches_tracked == model[1].num_batches_tracked == 4


def test_model_ema_is_frozen_and_in_eval_mode():
    ema = ModelEMA(small_model(), decay=0.99)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())

import math

import pytest
import torch

from selftrain.methods import METHODS
from selftrain.methods.noisy_student import soft_target_cross_entropy


def test_soft_cross_entropy_matches_hand_reference():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]])
    log_z = math.log(math.e + math.e**2 + math.e**3)
    row0 = -(0.25 * (2 - log_z) + 0.75 * (3 - log_z))
    row1 = math.log(3.0)
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_one_hot_targets_equal_plain_cross_entropy():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot), expected)


def test_objective_reports_loss_and_agreement_with_target_argmax():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    images = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # the last disagrees
    loss, metrics = METHODS["noisy_student"](model, images, targets)
    assert metrics["accuracy"].item() == pytest.approx(2 / 3)
    assert loss.requires_grad and metrics["loss"].item() == loss.item()


def test_lr_schedule_warms_up_then_decays_to_zero_and_stays_there():
    from selftrain.training.loop import cosine_with_warmup

    assert cosine_with_warmup(0, total=100, warmup=10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, total=100, warmup=10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, total=100, warmup=10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, total=100, warmup=10) == pytest.approx(0.0)
    assert cosine_with_warmup(150, total=100, warmup=10) == pytest.approx(0.0)

import math

import pytest
import torch

from selftrain.config import METHOD_NAMES, ONLINE_METHODS
from selftrain.methods import METHODS, Batch
from selftrain.methods.fixmatch import FixMatch
from selftrain.methods.supervised import soft_target_cross_entropy


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
    loss, metrics = METHODS["noisy_student"](2).loss(model, Batch(images, targets), step=0)
    assert metrics["accuracy"].item() == pytest.approx(2 / 3)
    assert loss.requires_grad and metrics["loss"].item() == loss.item()


def test_lr_schedule_warms_up_then_decays_to_zero_and_stays_there():
    from selftrain.training.loop import cosine_with_warmup

    assert cosine_with_warmup(0, total=100, warmup=10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, total=100, warmup=10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, total=100, warmup=10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, total=100, warmup=10) == pytest.approx(0.0)
    assert cosine_with_warmup(150, total=100, warmup=10) == pytest.approx(0.0)


def test_every_configurable_method_is_registered_and_knows_whether_it_reads_the_pool():
    assert sorted(METHODS) == sorted(METHOD_NAMES)
    assert sorted(name for name, cls in METHODS.items() if cls.needs_unlabeled) == sorted(ONLINE_METHODS)


def test_an_online_method_refuses_to_start_without_a_pool():
    with pytest.raises(ValueError, match="'fixmatch' learns from the unlabeled pool, but the pool is empty"):
        FixMatch(10, {}, total_steps=10, pool_size=0)


def test_fixmatch_loss_masks_by_threshold_and_uses_the_strong_view_against_weak_argmax():
    # model(x) = x: the inputs are the logits. Weak row 0 is confident (p = 0.9756 > 0.95) for
    # class 1, row 1 is not (p = 0.5761); the strong logits are what gets the loss.
    method = FixMatch(3, {"threshold": 0.95, "lambda_u": 2.0}, total_steps=10, pool_size=2)
    labeled = torch.tensor([[2.0, 0.0, 0.0]])
    weak = torch.tensor([[0.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    strong = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]])
    batch = Batch(labeled, torch.tensor([[1.0, 0.0, 0.0]]), weak, strong, torch.arange(2), torch.tensor([1, 2]))
    loss, metrics = method.loss(torch.nn.Identity(), batch, step=0)
    sup = -math.log(math.exp(2) / (math.exp(2) + 2))
    unsup_row0 = -(2 - math.log(math.e + math.e**2 + math.e**3))  # CE(strong row 0, class 1)
    unsup = unsup_row0 / 2  # averaged over both unlabeled rows; row 1 is masked
    assert metrics["unsup/mask_rate"].item() == pytest.approx(0.5)
    assert metrics["unsup/loss"].item() == pytest.approx(unsup, rel=1e-6)
    assert loss.item() == pytest.approx(sup + 2.0 * unsup, rel=1e-6)
    assert metrics["unsup/pseudo_accuracy"].item() == pytest.approx(1.0)  # row 0: class 1, truth 1
    assert metrics["unsup/top_class_fraction"].item() == pytest.approx(1.0)


def test_ema_follows_the_weights_at_its_decay_and_is_what_gets_evaluated():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    method = FixMatch(2, {"ema_decay": 0.9}, total_steps=10, pool_size=4)
    method.setup(model)
    method.after_step(model)  # the first update copies the weights (torch's AveragedModel)
    with torch.no_grad():
        model.weight.fill_(3.0)
    method.after_step(model)
    d = min(0.9, (1 + 1) / (10 + 1))  # the warmed-up decay after one update: 2/11
    assert method.eval_model(model).weight.item() == pytest.approx(d * 1.0 + (1 - d) * 3.0)
    for _ in range(200):  # past the warm-up: the configured decay
        method.after_step(model)
    before = method.eval_model(model).weight.item()
    with torch.no_grad():
        model.weight.fill_(13.0)
    method.after_step(model)
    assert method.eval_model(model).weight.item() == pytest.approx(0.9 * before + 0.1 * 13.0)
    restored = FixMatch(2, {"ema_decay": 0.9}, total_steps=10, pool_size=4)
    restored.setup(torch.nn.Linear(1, 1, bias=False))
    restored.load_state_dict(method.state_dict())
    assert restored.eval_model(model).weight.item() == pytest.approx(0.9 * before + 0.1 * 13.0)

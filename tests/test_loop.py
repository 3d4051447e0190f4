"""The training loop's own pieces, without a cluster: step counts, the size-keeping shuffle, the
empty-mask / collapse watch."""

from __future__ import annotations

import pytest
import torch

from selftrain.errors import TrainingError
from selftrain.training.loop import MIX_WINDOW, _mixed, _watch, steps_per_epoch


def test_steps_per_epoch_are_one_pass_over_the_stream_that_sets_the_pace():
    offline = {"rows": 1000, "batch_size": 64}
    assert steps_per_epoch(offline, world=1) == 15  # 15 full batches; the 40-row tail is dropped
    assert steps_per_epoch(offline, world=2) == 7
    assert steps_per_epoch({"rows": 50, "batch_size": 64}, world=1) == 1  # one short batch, kept
    online = {"online": True, "pool_rows": 10_000, "mu": 7, "batch_size": 32, "rows": 50}
    assert steps_per_epoch(online, world=1) == 10_000 // 224
    assert steps_per_epoch(online, world=2) == 10_000 // 448
    assert steps_per_epoch({**online, "steps_per_epoch": 5}, world=2) == 5  # the config wins


def test_mixed_keeps_every_batch_size_and_every_row_and_pairs_columns():
    sizes = [4, 4, 4, 4, 4, 4, 4, 4, 4, 3]  # a window of MIX_WINDOW and a short tail window
    assert MIX_WINDOW == 8
    start, batches = 0, []
    for size in sizes:
        rows = torch.arange(start, start + size)
        batches.append({"weak": rows, "index": rows * 10})
        start += size
    out = list(_mixed(iter(batches), torch.Generator().manual_seed(0)))
    assert [len(b["weak"]) for b in out] == sizes
    assert sorted(torch.cat([b["weak"] for b in out]).tolist()) == list(range(start))
    assert all(torch.equal(b["index"], b["weak"] * 10) for b in out)  # columns stay aligned
    first_window = torch.cat([b["weak"] for b in out[:8]])
    assert not torch.equal(first_window, torch.arange(32))  # rows did move across batches
    assert set(first_window.tolist()) == set(range(32))  # but only within their window


def test_an_empty_mask_is_warned_about_then_stops_the_run():
    config = {"online": True, "max_empty_epochs": 2, "collapse_fraction": 0.9, "num_classes": 10,
              "method": "fixmatch"}
    streak: dict[str, int] = {}
    empty = {"unsup/mask_rate": 0.0, "unsup/threshold": 0.95}
    with pytest.warns(UserWarning, match="no unlabeled image passed the mask in epoch 1"):
        _watch(empty, config, streak, epoch=1)
    _watch({"unsup/mask_rate": 0.3, "unsup/top_class_fraction": 0.2}, config, streak, epoch=2)  # resets
    with pytest.warns(UserWarning):
        _watch(empty, config, streak, epoch=3)
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="fixmatch stopped: no unlabeled image "
                                                                        "passed the mask in epoch 4"):
        _watch(empty, config, streak, epoch=4)


def test_pseudo_labels_collapsing_onto_one_class_stop_the_run():
    config = {"online": True, "max_empty_epochs": 1, "collapse_fraction": 0.9, "num_classes": 10,
              "method": "uda"}
    _watch({"unsup/mask_rate": 0.5, "unsup/top_class_fraction": 0.85}, config, {}, epoch=1)  # below the limit
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="97% of epoch 2's pseudo-labels are one class"):
        _watch({"unsup/mask_rate": 0.5, "unsup/top_class_fraction": 0.97}, config, {}, epoch=2)


def test_a_backbone_lr_scale_moves_the_backbone_that_much_less_and_the_classifier_the_same():
    import copy

    from selftrain.models.registry import build_model
    from selftrain.training.loop import param_groups

    torch.manual_seed(0)
    model = build_model("cnn_tiny", 10, 0.0, 0.0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    moved = {}
    for scale in (1.0, 0.1):
        trained = copy.deepcopy(model)
        groups = param_groups(trained, 0.05, scale)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each once
        optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
        torch.nn.functional.cross_entropy(trained(images), labels).backward()
        optimizer.step()
        moved[scale] = {n: (p - dict(model.named_parameters())[n]).abs().sum().item()
                        for n, p in trained.named_parameters()}
    head = ["fc.weight", "fc.bias"]  # cnn_tiny's classifier
    for name, step in moved[1.0].items():
        expected = step if name in head else 0.1 * step
        assert moved[0.1][name] == pytest.approx(expected, rel=1e-3), name  # float32 differences


def test_lars_scales_each_weights_step_by_its_trust_ratio_and_leaves_biases_and_norms_to_sgd():
    import copy

    from selftrain.training.loop import LARS_TRUST, make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    before = copy.deepcopy(model)
    lr, wd = 0.5, 1e-2
    optimizer = make_optimizer(model, {"optimizer": "lars", "lr": lr, "weight_decay": wd})
    model(torch.randn(6, 4)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, old in before.named_parameters():
        new, g = dict(model.named_parameters())[name], grads[name]
        if name in ("0.weight", "2.weight"):  # (g + wd w) * η |w| / (|g| + wd |w|), the first step
            trust = LARS_TRUST * old.norm() / (g.norm() + wd * old.norm())
            expected = old - lr * trust * (g + wd * old)
        else:  # the linear layers' biases, the batch norm's weight and bias: plain SGD, no decay
            expected = old - lr * g
        torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.equal(new, old), name  # every parameter moved
    with pytest.raises(ValueError, match="optimizer 'adam': choose sgd or lars"):
        make_optimizer(model, {"optimizer": "adam", "lr": lr, "weight_decay": wd})

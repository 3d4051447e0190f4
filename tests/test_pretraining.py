"""Self-supervised pretraining methods, backbones and evaluation protocols on tiny tensors: each
loss against a hand-written reference of the paper's formula, computed here from the network's
own outputs (no Ray, no MLflow; milliseconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.config import PRETRAIN_METHOD_NAMES, NoiseConfig, build_config
from selftrain.data.augment import augment_images, contrastive_transform
from selftrain.errors import ConfigError
from selftrain.evaluation.knn import knn_predict
from selftrain.evaluation.linear_probe import as_linear, fit_probe, linear_probe_accuracy
from selftrain.methods.base import Batch
from selftrain.models.backbone import classifier_name, load_backbone, strip_classifier
from selftrain.models.registry import build_model
from selftrain.pretraining import PRETRAIN_METHODS, check_pretrain_knobs
from selftrain.pretraining.jigsaw import permutation_set, shuffled_tiles
from selftrain.pretraining.rotation import rotated
from selftrain.self_training import check_method_knobs

N, SIZE = 6, 16


def _setup(name: str, knobs: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    method = PRETRAIN_METHODS[name](10, knobs or {}, total_steps=10)
    network = method.network(build_model("cnn_tiny", 10))
    method.setup(network)
    views = [torch.randn(N, 3, SIZE, SIZE), torch.randn(N, 3, SIZE, SIZE)]
    return method, network, Batch(views[0][:0], torch.zeros(0, 10), views=views)


def _outputs(network: nn.Module, batch: Batch) -> dict[str, list[torch.Tensor]]:
    """The network's outputs on both views (train-mode BatchNorm over the 2N images, exactly
    as the method's single forward pass sees them), split back per view."""
    with torch.no_grad():
        out = network(torch.cat(batch.views))
    return {k: list(v.chunk(2)) for k, v in out.items()}


def _nt_xent(z0: torch.Tensor, z1: torch.Tensor, t: float) -> float:
    """SimCLR Eq. 1, averaged over all 2N anchors, written out with loops."""
    z = F.normalize(torch.cat([z0, z1]), dim=1).double()
    n, total = len(z0), 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [(z[i] @ z[k]).item() / t for k in range(2 * n) if k != i]
        total += -((z[i] @ z[positive]).item() / t - math.log(sum(math.exp(s) for s in sims)))
    return total / (2 * n)


def test_simclr_loss_is_nt_xent_over_both_views():
    method, network, batch = _setup("simclr", {"temperature": 0.3})
    out = _outputs(network, batch)
    loss, _ = method.loss(network, batch, 0)
    assert loss.item() == pytest.approx(_nt_xent(*out["z"], 0.3), rel=1e-4)


def test_moco_loss_is_infonce_against_the_momentum_key_and_the_queue_and_enqueues_keys():
    method, network, batch = _setup("moco_v2", {"temperature": 0.2, "queue_size": 8})
    queue = method.criterion.memory_bank.bank.clone()  # (8, dim), unit rows
    out = _outputs(network, batch)
    query, key = F.normalize(out["z"][0], dim=1), F.normalize(out["z_momentum"][1], dim=1)
    logits = torch.cat([(query * key).sum(1, keepdim=True), query @ F.normalize(queue, dim=1).T], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long))
    loss, _ = method.loss(network, batch, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # the keys of this step were written into the queue, and the queue survives a checkpoint
    enqueued = method.criterion.memory_bank.bank
    assert torch.allclose(enqueued[:N], key, atol=1e-5)
    state = method.state_dict()
    restored, _, _ = _setup("moco_v2", {"queue_size": 8}, seed=1)
    assert not torch.allclose(restored.criterion.memory_bank.bank, enqueued)
    restored.load_state_dict(state)
    assert torch.equal(restored.criterion.memory_bank.bank, enqueued)
    assert int(restored.criterion.memory_bank.bank_ptr) == N


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_byol_and_simsiam_regress_the_other_views_target(name):
    method, network, batch = _setup(name)
    out = _outputs(network, batch)
    (p0, p1) = out["p"]
    (t0, t1) = out["z_momentum"] if name == "byol" else out["z"]
    expected = -0.5 * (F.cosine_similarity(p0, t1).mean() + F.cosine_similarity(p1, t0).mean())
    loss, _ = method.loss(network, batch, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_simsiam_target_gets_no_gradient():
    """The gradient equals that of the formula with constant targets (the stop-gradient of
    Eq. 3); without it, gradient through the target branch would make them differ."""
    method, network, batch = _setup("simsiam")
    loss, _ = method.loss(network, batch, 0)
    g_method = torch.autograd.grad(loss, list(network.backbone.parameters()))
    out = network(torch.cat(batch.views))
    (z0, z1), (p0, p1) = out["z"].chunk(2), out["p"].chunk(2)
    detached = -0.5 * (F.cosine_similarity(p0, z1.detach()).mean() + F.cosine_similarity(p1, z0.detach()).mean())
    undetached = -0.5 * (F.cosine_similarity(p0, z1).mean() + F.cosine_similarity(p1, z0).mean())
    g_detached = torch.autograd.grad(detached, list(network.backbone.parameters()), retain_graph=True)
    g_undetached = torch.autograd.grad(undetached, list(network.backbone.parameters()))
    for a, b in zip(g_method, g_detached, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(g_method, g_undetached, strict=True))


def test_barlow_twins_loss_is_the_cross_correlation_to_identity():
    method, network, batch = _setup("barlow_twins", {"projection_dim": 16, "hidden_dim": 16, "redundancy_weight": 0.01})
    z0, z1 = (z.double() for z in _outputs(network, batch)["z"])

    def standardise(z):  # BatchNorm1d without affine: biased variance, eps 1e-5
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = standardise(z0).T @ standardise(z1) / N
    on = ((1 - torch.diagonal(c)) ** 2).sum()
    off = (c ** 2).sum() - (torch.diagonal(c) ** 2).sum()
    loss, _ = method.loss(network, batch, 0)
    assert loss.item() == pytest.approx((on + 0.01 * off).item(), rel=1e-4)


def test_vicreg_loss_is_invariance_variance_covariance():
    method, network, batch = _setup("vicreg", {"projection_dim": 16, "hidden_dim": 16})
    z0, z1 = (z.double() for z in _outputs(network, batch)["z"])

    def variance(z):  # hinge on the per-dimension std at 1 (eps 1e-4), as the official code
        return F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()

    def covariance(z):
        centred = z - z.mean(0)
        cov = centred.T @ centred / (N - 1)
        return ((cov ** 2).sum() - (torch.diagonal(cov) ** 2).sum()) / z.shape[1]

    # facebookresearch/vicreg main_vicreg.py: the two variance terms are halved, the covariance terms summed
    expected = 25 * F.mse_loss(z0, z1) + 25 * 0.5 * (variance(z0) + variance(z1)) + covariance(z0) + covariance(z1)
    loss, _ = method.loss(network, batch, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_dino_loss_is_cross_entropy_to_the_centred_sharpened_teacher_and_moves_the_centre():
    method, network, batch = _setup("dino", {"prototypes": 32, "hidden_dim": 16, "projection_dim": 8})
    centre = torch.randn(1, 32) * 0.1
    method.criterion.center.copy_(centre[None])
    out = _outputs(network, batch)
    teacher = [F.softmax((t - centre) / 0.04, dim=1) for t in out["z_momentum"]]
    student = [F.log_softmax(s / 0.1, dim=1) for s in out["z"]]
    expected = 0.5 * (-(teacher[0] * student[1]).sum(1).mean() - (teacher[1] * student[0]).sum(1).mean())
    loss, _ = method.loss(network, batch, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    new_centre = 0.9 * centre + 0.1 * torch.cat(out["z_momentum"]).mean(0, keepdim=True)
    assert torch.allclose(method.criterion.center[0], new_centre, atol=1e-5)
    assert torch.equal(method.state_dict()["criterion"]["center"], method.criterion.center)


@pytest.mark.parametrize("name", ["byol", "dino", "moco_v2"])
def test_momentum_encoder_follows_the_online_weights_by_the_scheduled_decay(name):
    method, network, batch = _setup(name, {"momentum": 0.9})
    online = next(network.backbone.parameters())
    with torch.no_grad():
        online.add_(1.0)  # as if an optimizer step moved the online weights
    before = next(network.backbone_momentum.parameters()).clone()
    decay = method.momentum(0)
    method.after_step(network)
    after = next(network.backbone_momentum.parameters())
    assert torch.allclose(after, decay * before + (1 - decay) * online, atol=1e-6)
    assert decay == pytest.approx(0.9)  # step 0: the start of the cosine (and MoCo's constant)
    if name != "moco_v2":  # BYOL, DINO: cosine to 1 over the run
        assert method.momentum(method.total_steps) == pytest.approx(1.0)
        assert 0.9 < method.momentum(method.total_steps // 2) < 1.0
    assert method.state_dict()["step"] == 1


def test_rotation_predicts_each_of_the_four_rotations():
    method, network, batch = _setup("rotation")
    image = batch.views[0]
    views, labels = rotated(image)
    assert torch.equal(views[labels == 1][0], torch.rot90(image[0], 1, dims=(-2, -1)))
    with torch.no_grad():
        logits = network(views)["z"]
    loss, metrics = method.loss(network, batch, 0)
    expected = F.cross_entropy(logits, torch.arange(4).repeat_interleave(N))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["pretrain/rotation_accuracy"].item() == pytest.approx(
        (logits.argmax(1) == torch.arange(4).repeat_interleave(N)).float().mean().item())


def test_jigsaw_tiles_follow_the_permutation_and_the_set_is_spread_out():
    permutations = permutation_set(10)
    assert len({tuple(p) for p in permutations}) == 10
    assert min((a != b).sum() for i, a in enumerate(permutations) for b in permutations[:i]) >= 6
    # an image whose 3x3 tiles hold their own index: after shuffling, slot s holds tile perm[s]
    image = torch.arange(9, dtype=torch.float).reshape(3, 3).repeat_interleave(8, 0).repeat_interleave(8, 1)
    images = image.expand(2, 3, 24, 24)
    labels = torch.tensor([3, 7])
    tiles = shuffled_tiles(images, torch.from_numpy(permutations), labels, grid=3)
    assert tiles.shape == (18, 3, 8, 8)
    for i, label in enumerate(labels):
        assert tiles[i * 9:(i + 1) * 9, 0, 0, 0].tolist() == permutations[label].tolist()


def test_saved_backbone_is_a_classifier_model_whose_weights_a_teacher_starts_from():
    method, network, batch = _setup("simclr")
    loss, _ = method.loss(network, batch, 0)
    loss.backward()
    with torch.no_grad():
        for p in network.backbone.parameters():
            p.add_(0.5)  # trained away from any fresh initialisation
    saved = method.eval_model(network).state_dict()
    assert saved.keys() == build_model("cnn_tiny", 10).state_dict().keys()
    teacher = build_model("cnn_tiny", 7)  # another label set: a new classifier
    head = classifier_name(teacher)
    fresh_head = teacher.state_dict()[f"{head}.weight"].clone()
    left_out = load_backbone(teacher, saved)
    assert left_out == [f"{head}.bias", f"{head}.weight"]
    for key, value in teacher.state_dict().items():
        if key.startswith(head):
            continue
        assert torch.equal(value, saved[key]), key
    assert torch.equal(teacher.state_dict()[f"{head}.weight"], fresh_head)
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone(build_model("cnn_small", 10), saved)


def test_strip_classifier_gives_features_of_the_linear_layers_width():
    model = build_model("resnet18_cifar", 10)
    backbone, linear, name = strip_classifier(model)
    assert name == "fc.1" and linear.in_features == 512
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_weighted_knn_weights_votes_by_similarity():
    # two far class-0 neighbours against one close class-1 neighbour: a plain majority says 0,
    # exp(similarity / 0.1) says 1
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(query, bank, labels, 2, k=3, temperature=0.1).item() == 1
    assert knn_predict(query, bank, labels, 2, k=3, temperature=100.0).item() == 0  # ~ equal weights
    assert knn_predict(query, bank, labels, 2, k=1).item() == 1
    with pytest.raises(ValueError, match="at least one"):
        knn_predict(query, bank[:0], labels[:0], 2)


def test_linear_probe_separates_separable_features_and_needs_two_classes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    labels = np.repeat(np.arange(3), 20)
    features = centres[labels] + rng.normal(size=(60, 8))
    test_labels = np.repeat(np.arange(3), 30)
    test = centres[test_labels] + rng.normal(size=(90, 8))
    assert linear_probe_accuracy(features, labels, test, test_labels) > 0.9  # chance: 0.33
    shuffled = rng.permutation(labels)  # labels unrelated to the features: near chance
    assert linear_probe_accuracy(features, shuffled, test, test_labels) < 0.7
    with pytest.raises(ValueError, match="two classes"):
        linear_probe_accuracy(features, np.zeros(60), test, test_labels)


@pytest.mark.parametrize("standardise", [True, False])
@pytest.mark.parametrize("fitted_classes", [[0, 1, 2, 3], [0, 2, 3], [1, 3]])
def test_probe_as_one_linear_layer_gives_the_probes_probabilities(fitted_classes, standardise):
    """The standardisation folded into the weights: softmax(x W^T + b) on raw features equals
    the fitted probe's predict_proba; a class with no labeled image is never predicted."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 6)) * 3 + 5  # raw features far from zero mean and unit scale
    labels = np.repeat(fitted_classes, 15)
    features = centres[labels] + rng.normal(size=(len(labels), 6)) * rng.uniform(0.5, 4, size=6)
    probe = fit_probe(features, labels, standardise=standardise)
    weight, bias = as_linear(probe, num_classes=4)
    assert weight.shape == (4, 6) and bias.shape == (4,)
    queries = centres[rng.integers(0, 4, size=50)] + rng.normal(size=(50, 6))
    probs = torch.softmax(torch.from_numpy(queries @ weight.T.astype(np.float64) + bias), dim=1).numpy()
    expected = np.zeros((50, 4))
    expected[:, probe[-1].classes_] = probe.predict_proba(queries)
    assert np.abs(probs - expected).max() < 1e-4
    absent = sorted(set(range(4)) - set(fitted_classes))
    assert not np.isin(probs.argmax(1), absent).any()


def test_contrastive_views_of_one_image_differ():
    image = np.random.default_rng(0).integers(0, 255, size=(1, SIZE, SIZE, 3), dtype=np.uint8)
    transform = contrastive_transform(SIZE, NoiseConfig(), crop_scale_min=0.2, color_jitter=0.4)
    torch.manual_seed(0)
    a, b = augment_images(image, transform), augment_images(image, transform)
    assert a.shape == (1, 3, SIZE, SIZE) and a.dtype == np.uint8
    assert not np.array_equal(a, b)


def _bar_angles(views: np.ndarray) -> np.ndarray:
    """Orientation (degrees, -90..90) of each view's bright pixels, from their second moments."""
    angles = []
    for view in views[:, 0].astype(float):
        ys, xs = np.nonzero(view > 127)
        cov = np.cov(np.stack([xs, ys]))
        angles.append(np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])))
    return np.asarray(angles)


def test_contrastive_views_rotate_only_when_asked():
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[:, 14:18, 4:28] = 255  # a horizontal bar
    images = np.repeat(image, 64, axis=0)
    seeds = np.arange(64)
    plain = contrastive_transform(32, NoiseConfig(horizontal_flip=False), crop_scale_min=1.0, color_jitter=0.0)
    rotating = contrastive_transform(32, NoiseConfig(horizontal_flip=False), crop_scale_min=1.0, color_jitter=0.0,
                                     rotation=45.0)
    still = _bar_angles(augment_images(images, plain, seeds=seeds))
    turned = _bar_angles(augment_images(images, rotating, seeds=seeds))
    assert np.abs(still).max() < 2.0  # crops of scale 1 change the aspect a little, never the angle
    # rotations drawn uniformly from -45..45 degrees: std 26, and both ways
    assert 18 < turned.std() < 32 and turned.min() < -20 and turned.max() > 20


def test_config_names_every_method_and_refuses_unread_knobs():
    assert set(PRETRAIN_METHOD_NAMES) == set(PRETRAIN_METHODS)
    check_pretrain_knobs("moco_v2", ["queue_size", "temperature"])
    with pytest.raises(ConfigError, match="pretrain.queue_size: pretraining method 'simclr' does not read"):
        check_method_knobs(build_config({"pretrain": {"method": "simclr", "queue_size": 16}}))
    with pytest.raises(ConfigError, match="model.init=pretrain needs a `pretrain:` section"):
        build_config({"model": {"init": "pretrain"}})
    assert build_config({"pretrain": {"method": "byol"}}).teacher_init == "pretrain"
    assert build_config({}).teacher_init == "none"
    assert build_config({"pretrain": {"method": "vicreg", "optimizer": "lars"}}).pretrain.optimizer == "lars"
    with pytest.raises(ConfigError, match=r"pretrain.optimizer.*'sgd' or 'lars'"):
        build_config({"pretrain": {"method": "vicreg", "optimizer": "adam"}})

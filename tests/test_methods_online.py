"""Online and distillation objectives on tiny hand-made tensors.

The model is `nn.Identity()` wherever possible, so an input row IS its logits and every expected
value below is computed by hand in the test (with `math`), never by the code under test.
"""

import math

import pytest
import torch
from torch import nn

from selftrain.methods.base import Batch
from selftrain.methods.entropy_min import EntropyMin
from selftrain.methods.kd import KnowledgeDistillation
from selftrain.methods.mean_teacher import MeanTeacher
from selftrain.methods.online_pseudo_label import PseudoLabel
from selftrain.methods.tf_kd import TeacherFreeKD
from selftrain.methods.uda import UDA

ONLINE_KEYS = {"loss", "accuracy", "sup/loss", "unsup/loss", "unsup/threshold",
               "unsup/mask_rate", "unsup/top_class_fraction", "unsup/pseudo_accuracy"}


# -- hand arithmetic (plain Python floats) -------------------------------------------------------
def softmax(row, T=1.0):
    e = [math.exp(z / T) for z in row]
    return [v / sum(e) for v in e]


def ce(row, cls):
    """-log softmax(row)[cls]."""
    return math.log(sum(math.exp(z) for z in row)) - row[cls]


def soft_ce(target, row):
    """-sum_c target_c log softmax(row)_c."""
    lse = math.log(sum(math.exp(z) for z in row))
    return -sum(t * (z - lse) for t, z in zip(target, row))


def entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def t(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


def one_hot(classes, k):
    return torch.nn.functional.one_hot(torch.tensor(classes), k).float()


def online_batch(labeled, classes, weak, strong=None, truth=None, k=3):
    return Batch(labeled=labeled, targets=one_hot(classes, k), weak=weak, strong=strong,
                 index=torch.arange(len(weak)), truth=None if truth is None else torch.tensor(truth))


# -- Pseudo-Label ----------------------------------------------------------------------------------
PL_LABELED = [[2.0, 0.0, 0.0]]
# max softmax: e^5/(e^5+2) = 0.987 (passes 0.95), e/(e+2) = 0.576 (masked), e^4/(e^4+2) = 0.965 (passes)
PL_WEAK = [[5.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 4.0, 0.0]]


@pytest.mark.parametrize("step, ramp", [(0, 0.0), (20, 0.5), (40, 1.0), (90, 1.0)])
def test_pseudo_label_ramps_the_masked_hard_label_loss(step, ramp):
    method = PseudoLabel(num_classes=3, total_steps=100, pool_size=8)  # warm-up 0.4 * 100 = 40 steps
    method.setup(nn.Identity())
    weak = t(PL_WEAK, grad=True)
    loss, metrics = method.loss(nn.Identity(), online_batch(t(PL_LABELED), [0], weak, truth=[0, 2, 2]), step)

    sup = ce(PL_LABELED[0], 0)
    unsup = (ce(PL_WEAK[0], 0) + 0.0 + ce(PL_WEAK[2], 1)) / 3  # masked row counts as zero
    assert loss.item() == pytest.approx(sup + ramp * 1.0 * unsup, rel=1e-5)
    assert metrics["sup/loss"].item() == pytest.approx(sup, rel=1e-5)
    assert metrics["unsup/loss"].item() == pytest.approx(unsup, rel=1e-5)
    assert metrics["unsup/mask_rate"].item() == pytest.approx(2 / 3)
    assert metrics["unsup/threshold"].item() == pytest.approx(0.95)
    assert metrics["unsup/pseudo_accuracy"].item() == pytest.approx(0.5)  # pseudo 0, 1 vs truth 0, 2
    assert ONLINE_KEYS <= set(metrics)

    # The label is a constant: the gradient on a passing row is ramp/3 * (softmax - one_hot).
    loss.backward()
    p0 = softmax(PL_WEAK[0])
    expected = [ramp / 3 * (p0[0] - 1), ramp / 3 * p0[1], ramp / 3 * p0[2]]
    assert weak.grad[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert weak.grad[1].abs().sum().item() == 0.0  # the masked row gets nothing


def test_pseudo_label_threshold_knob_changes_the_mask():
    method = PseudoLabel(num_classes=3, knobs={"threshold": 0.5}, total_steps=100, pool_size=8)
    method.setup(nn.Identity())
    _, metrics = method.loss(nn.Identity(), online_batch(t(PL_LABELED), [0], t(PL_WEAK)), 40)
    assert metrics["unsup/mask_rate"].item() == pytest.approx(1.0)  # 0.576 >= 0.5 now


# -- Mean Teacher ----------------------------------------------------------------------------------
def linear(weight):
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
    return model


W_STUDENT = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
W_TEACHER = [[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]


def logits_of(weight, x):
    return [sum(w * v for w, v in zip(row, x)) for row in weight]


def mt_setup(step_weights=W_TEACHER, **knobs):
    student = linear(W_STUDENT)
    method = MeanTeacher(num_classes=3, knobs=knobs, total_steps=100, pool_size=8)
    method.setup(student)
    with torch.no_grad():
        method.ema.module.weight.copy_(torch.tensor(step_weights))
    return method, student


MT_X, MT_WEAK, MT_STRONG = [[1.0, 0.0]], [[1.0, 0.5], [0.0, 2.0]], [[0.5, 1.0], [1.0, -1.0]]


def mt_expected():
    sup = ce(logits_of(W_STUDENT, MT_X[0]), 0)
    cons = 0.0
    for w, s in zip(MT_WEAK, MT_STRONG):
        ps, pt = softmax(logits_of(W_STUDENT, s)), softmax(logits_of(W_TEACHER, w))
        cons += sum((a - b) ** 2 for a, b in zip(ps, pt)) / len(ps)  # averaged over classes
    return sup, cons / len(MT_WEAK)  # and over the batch


@pytest.mark.parametrize("step, ramp", [(0, 0.0), (20, 0.5), (40, 1.0), (99, 1.0)])
def test_mean_teacher_mse_value_and_ramp(step, ramp):
    method, student = mt_setup()
    batch = online_batch(t(MT_X), [0], t(MT_WEAK), t(MT_STRONG), truth=[0, 2])
    loss, metrics = method.loss(student, batch, step)
    sup, cons = mt_expected()
    assert cons > 0
    assert metrics["unsup/loss"].item() == pytest.approx(cons, rel=1e-5)
    assert loss.item() == pytest.approx(sup + 50.0 * ramp * cons, rel=1e-5)
    assert metrics["unsup/mask_rate"].item() == 1.0
    # teacher argmax: weak row 0 -> logits [2, 0, 0.5] -> 0; row 1 -> [0, 0, 2] -> 2
    assert metrics["unsup/pseudo_accuracy"].item() == pytest.approx(1.0)
    assert ONLINE_KEYS <= set(metrics)


def test_mean_teacher_consistency_needs_two_views_and_is_positive_when_they_differ():
    student = linear(W_STUDENT)
    method = MeanTeacher(num_classes=3, total_steps=100, pool_size=8)
    method.setup(student)  # EMA == student right after setup: only the views differ
    differ = online_batch(t(MT_X), [0], t(MT_WEAK), t(MT_STRONG))
    same = online_batch(t(MT_X), [0], t(MT_WEAK), t(MT_WEAK))
    assert method.loss(student, differ, 50)[1]["unsup/loss"].item() > 1e-3
    assert method.loss(student, same, 50)[1]["unsup/loss"].item() == pytest.approx(0.0, abs=1e-7)


def test_mean_teacher_gradient_never_reaches_the_ema():
    method, student = mt_setup()
    loss, _ = method.loss(student, online_batch(t(MT_X), [0], t(MT_WEAK), t(MT_STRONG)), 60)
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.ema.parameters())
    assert not method.ema.training  # the target comes from the eval-mode teacher


def test_mean_teacher_teacher_is_the_predictable_ema():
    student = linear(W_STUDENT)
    method = MeanTeacher(num_classes=3, knobs={"ema_decay": 0.5}, total_steps=100, pool_size=8)
    method.setup(student)
    method.after_step(student)  # the first update copies the student
    with torch.no_grad():
        student.weight.copy_(torch.tensor(W_TEACHER))
    method.after_step(student)  # d * old + (1 - d) * new, d = min(0.5, 2/11): the warmed-up decay
    d = min(0.5, 2 / 11)
    expected = [[d * a + (1 - d) * b for a, b in zip(r, s)] for r, s in zip(W_STUDENT, W_TEACHER)]
    assert torch.allclose(method.ema.module.weight, torch.tensor(expected))

    # ... and that EMA is what the consistency target is computed from.
    with torch.no_grad():
        student.weight.copy_(torch.tensor(W_STUDENT))
    _, metrics = method.loss(student, online_batch(t(MT_X), [0], t(MT_WEAK), t(MT_STRONG)), 50)
    cons = sum(sum((a - b) ** 2 for a, b in zip(softmax(logits_of(W_STUDENT, s)), softmax(logits_of(expected, w))))
               for w, s in zip(MT_WEAK, MT_STRONG)) / 2 / 3  # over the batch and the 3 classes
    assert metrics["unsup/loss"].item() == pytest.approx(cons, rel=1e-5)


def test_ema_state_round_trips_into_a_new_instance():
    method, student = mt_setup()
    method.after_step(student)
    method.after_step(linear(W_TEACHER))
    state = method.state_dict()
    fresh = MeanTeacher(num_classes=3, total_steps=100, pool_size=8)
    fresh.setup(linear([[9.0, 9.0]] * 3))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ema.module.weight, method.ema.module.weight)
    assert fresh.ema.n_averaged.item() == method.ema.n_averaged.item() == 2


# -- UDA ---------------------------------------------------------------------------------------------
UDA_X = [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.0]]
UDA_CLASSES = [0, 1, 0]
# max softmax: e^3/(e^3+2) = 0.909 (passes 0.8), e^2/(e^2+2) = 0.787 (masked), e^2.2/(e^2.2+2) = 0.819
UDA_WEAK = [[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.2, 0.0]]
UDA_STRONG = [[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def uda_unsup(T):
    return (soft_ce(softmax(UDA_WEAK[0], T), UDA_STRONG[0]) + soft_ce(softmax(UDA_WEAK[2], T), UDA_STRONG[2])) / 3


@pytest.mark.parametrize("T", [0.4, 1.0])
def test_uda_sharpens_targets_with_T_and_masks_at_0_8(T):
    method = UDA(num_classes=3, knobs={"temperature": T}, total_steps=100, pool_size=8)
    method.setup(nn.Identity())
    weak = t(UDA_WEAK, grad=True)
    loss, metrics = method.loss(nn.Identity(), online_batch(t(UDA_X), UDA_CLASSES, weak, t(UDA_STRONG), [0, 1, 0]), 10)
    sup = sum(ce(row, c) for row, c in zip(UDA_X, UDA_CLASSES)) / 3  # tsa none: plain mean
    assert metrics["unsup/loss"].item() == pytest.approx(uda_unsup(T), rel=1e-5)
    assert loss.item() == pytest.approx(sup + uda_unsup(T), rel=1e-5)
    assert metrics["unsup/mask_rate"].item() == pytest.approx(2 / 3)
    assert metrics["unsup/threshold"].item() == pytest.approx(0.8)
    assert metrics["unsup/pseudo_accuracy"].item() == pytest.approx(0.5)  # pseudo 0, 1 vs truth 0, 0
    assert ONLINE_KEYS <= set(metrics)
    loss.backward()
    assert weak.grad is None or weak.grad.abs().sum().item() == 0.0  # the target is detached


def test_uda_temperature_matters():
    assert abs(uda_unsup(0.4) - uda_unsup(1.0)) > 1e-2  # so the parametrised test above can tell


# Correct-class probabilities of UDA_X: e^2/(e^2+2) = 0.787, 1/(e+2) = 0.212, e^.5/(e^.5+2) = 0.452.
# At t = 50/100, K = 3: η = α(1 - 1/3) + 1/3 with α = 0.5 (linear), 1 - e^-2.5 (log), e^-2.5 (exp).
@pytest.mark.parametrize("schedule, alpha, kept", [
    ("linear", 0.5, [1, 2]),                  # η = 0.667: drops row 0
    ("log", 1 - math.exp(-2.5), [0, 1, 2]),   # η = 0.945: keeps all
    ("exp", math.exp(-2.5), [1]),             # η = 0.388: drops rows 0 and 2
    ("none", 1.0, [0, 1, 2]),
])
def test_uda_training_signal_annealing(schedule, alpha, kept):
    method = UDA(num_classes=3, knobs={"tsa": schedule}, total_steps=100, pool_size=8)
    method.setup(nn.Identity())
    _, metrics = method.loss(nn.Identity(), online_batch(t(UDA_X), UDA_CLASSES, t(UDA_WEAK), t(UDA_STRONG)), 50)
    assert metrics["sup/tsa_threshold"].item() == pytest.approx(alpha * 2 / 3 + 1 / 3, rel=1e-6)
    expected = sum(ce(UDA_X[i], UDA_CLASSES[i]) for i in kept) / len(kept)
    assert metrics["sup/loss"].item() == pytest.approx(expected, rel=1e-5)
    assert metrics["sup/tsa_kept"].item() == pytest.approx(len(kept) / 3)


# -- Entropy minimisation ----------------------------------------------------------------------------
def test_entropy_min_adds_weighted_mean_entropy_with_gradient():
    method = EntropyMin(num_classes=3, total_steps=100, pool_size=8)
    method.setup(nn.Identity())
    x, w = [[1.0, 0.0, 0.0]], [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    weak = t(w, grad=True)
    loss, metrics = method.loss(nn.Identity(), online_batch(t(x), [0], weak, truth=[0, -1]), 5)
    h = (entropy(softmax(w[0])) + math.log(3)) / 2
    assert metrics["unsup/loss"].item() == pytest.approx(h, rel=1e-5)
    assert loss.item() == pytest.approx(ce(x[0], 0) + 0.1 * h, rel=1e-5)
    assert metrics["unsup/mask_rate"].item() == 1.0 and metrics["unsup/threshold"].item() == 0.0
    assert metrics["unsup/pseudo_accuracy"].item() == 1.0  # the unknown truth (-1) is skipped
    assert ONLINE_KEYS <= set(metrics)
    loss.backward()
    # dH/dz_j = -p_j (log p_j + H); times λ = 0.1 and the batch mean 1/2
    p, h0 = softmax(w[0]), entropy(softmax(w[0]))
    assert weak.grad[0].tolist() == pytest.approx([-0.05 * v * (math.log(v) + h0) for v in p], abs=1e-6)
    assert weak.grad[1].abs().max().item() < 1e-7  # the uniform row is a stationary point


# -- Knowledge distillation --------------------------------------------------------------------------
KD_LOGITS = [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.5, -1.0, 1.0]]
KD_TARGETS = [[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]  # soft, one-hot, exact zero


def kd_batch(logits, targets, grad=False):
    return Batch(labeled=t(logits, grad), targets=t(targets))


def test_kd_with_alpha_zero_is_cross_entropy_on_the_top_class():
    method = KnowledgeDistillation(num_classes=3, knobs={"alpha": 0.0})
    loss, metrics = method.loss(nn.Identity(), kd_batch(KD_LOGITS, KD_TARGETS), 0)
    expected = (ce(KD_LOGITS[0], 0) + ce(KD_LOGITS[1], 1) + ce(KD_LOGITS[2], 0)) / 3  # argmax ties -> first
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(0.0)  # predicted 1, 2, 2 vs 0, 1, 0


def test_kd_hand_value_at_T4_with_soft_one_hot_and_zero_targets():
    T = 4.0
    method = KnowledgeDistillation(num_classes=3)  # α = 0.9, T = 4
    logits = kd_batch(KD_LOGITS, KD_TARGETS, grad=True)
    loss, metrics = method.loss(nn.Identity(), logits, 0)
    kls = []
    for z, y in zip(KD_LOGITS, KD_TARGETS):
        p_t = [v ** (1 / T) for v in y]
        p_t = [v / sum(p_t) for v in p_t]  # re-tempered teacher, zeros stay zero
        kls.append(kl(p_t, softmax(z, T)))
    distill = T * T * sum(kls) / 3
    sup = (ce(KD_LOGITS[0], 0) + ce(KD_LOGITS[1], 1) + ce(KD_LOGITS[2], 0)) / 3
    assert kls[1] == pytest.approx(-math.log(softmax(KD_LOGITS[1], T)[1]))  # one-hot stays one-hot
    assert metrics["kd/loss"].item() == pytest.approx(distill, rel=1e-5)
    assert metrics["sup/loss"].item() == pytest.approx(sup, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * sup + 0.9 * distill, rel=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.labeled.grad).all()


def test_kd_retempering_the_teacher_softmax_equals_softmax_of_logits_over_T():
    teacher_logits = [2.0, -1.0, 0.5]
    T = 4.0
    via_logits = softmax(teacher_logits, T)
    method = KnowledgeDistillation(num_classes=3, knobs={"alpha": 1.0})
    student = [[0.3, 0.1, -0.2]]
    loss, _ = method.loss(nn.Identity(), kd_batch(student, [softmax(teacher_logits)]), 0)
    assert loss.item() == pytest.approx(T * T * kl(via_logits, softmax(student[0], T)), rel=1e-4)


# -- Teacher-free KD ---------------------------------------------------------------------------------
def test_tf_kd_virtual_teacher_and_loss_by_hand():
    from selftrain.methods.tf_kd import virtual_teacher

    virtual = virtual_teacher(torch.tensor([0, 2]), 4, 0.9)
    expected = torch.tensor([[0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3], [0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3]])
    assert torch.allclose(virtual, expected)

    T, a, K = 20.0, 0.9, 4
    logits = [[1.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0]]
    method = TeacherFreeKD(num_classes=K)  # α = 0.5, T = 20, a = 0.9
    loss, metrics = method.loss(nn.Identity(), Batch(labeled=t(logits), targets=one_hot([0, 2], K)), 0)
    hi, lo = a ** (1 / T), ((1 - a) / (K - 1)) ** (1 / T)
    rows = []
    for z, c in zip(logits, [0, 2]):
        v = [hi if k == c else lo for k in range(K)]
        v = [x / sum(v) for x in v]
        rows.append((ce(z, c), kl(v, softmax(z, T))))
    sup = sum(r[0] for r in rows) / 2
    distill = T * T * sum(r[1] for r in rows) / 2
    assert metrics["sup/loss"].item() == pytest.approx(sup, rel=1e-6)
    assert metrics["kd/loss"].item() == pytest.approx(distill, rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * sup + 0.5 * distill, rel=1e-4)
    assert metrics["accuracy"].item() == pytest.approx(0.5)


# -- contract ------------------------------------------------------------------------------------------
def test_online_methods_refuse_an_empty_pool_and_offline_ones_do_not_need_it():
    for cls in (PseudoLabel, MeanTeacher, UDA, EntropyMin):
        assert cls.needs_unlabeled
        with pytest.raises(ValueError):
            cls(num_classes=3, total_steps=10, pool_size=None)
    for cls in (KnowledgeDistillation, TeacherFreeKD):
        assert not cls.needs_unlabeled
        cls(num_classes=3, pool_size=None).setup(nn.Identity())
    names = {c.name for c in (PseudoLabel, MeanTeacher, UDA, EntropyMin, KnowledgeDistillation, TeacherFreeKD)}
    assert names == {"pseudo_label", "mean_teacher", "uda", "entropy_min", "kd", "tf_kd"}

"""FlexMatch, FreeMatch, SoftMatch and Dash on hand-made tensors.

The model is the identity, so the inputs ARE the logits; weak-view logits are log-probabilities,
so softmax(weak) is the probability table written in the test. Every expected number is worked
out here with plain `math` from the papers' formulas, never by calling the code under test.
"""

from __future__ import annotations

import io
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selftrain.methods.base import Batch
from selftrain.methods.dash import Dash
from selftrain.methods.flexmatch import FlexMatch
from selftrain.methods.freematch import FreeMatch
from selftrain.methods.softmatch import SoftMatch

C = 3
IDENTITY = torch.nn.Identity()

# Weak-view probabilities shared by several tests: confidences 0.7, 0.4, 0.6, 0.4, classes 0, 0, 1, 2.
PROBS = [[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]]
STRONG = [[2.0, 0.0, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 0.5], [0.0, 0.2, 0.1]]
LABELED = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
LABELS = [0, 1]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def ce(row, label):
    return -math.log(softmax(row)[label])


def argmax(row):
    return max(range(len(row)), key=lambda c: row[c])


def make_batch(weak_probs=PROBS, strong=STRONG, labeled=LABELED, labels=LABELS, index=(0, 1, 2, 3), truth=None):
    return Batch(labeled=torch.tensor(labeled), targets=torch.nn.functional.one_hot(torch.tensor(labels), C).float(),
                 weak=torch.tensor([[math.log(p) for p in row] for row in weak_probs]),
                 strong=torch.tensor(strong), index=torch.tensor(index, dtype=torch.long),
                 truth=None if truth is None else torch.tensor(truth))


def expected_loss(mask, weak_probs=PROBS, strong=STRONG, lambda_u=1.0):
    """(supervised, unsupervised): mean CE of the labeled rows; mean_b mask_b · CE(strong_b, argmax p_b)."""
    supervised = sum(ce(r, y) for r, y in zip(LABELED, LABELS)) / len(LABELED)
    unsup = sum(w * ce(s, argmax(p)) for w, p, s in zip(mask, weak_probs, strong)) / len(mask)
    return supervised, unsup


# -- FlexMatch ---------------------------------------------------------------------------------

FLEX_PROBS = [[0.6, 0.3, 0.1], [0.5, 0.25, 0.25], [0.01, 0.97, 0.02], [0.2, 0.3, 0.5]]
FLEX_RECORDS = [0, 0, 0, 1, -1, -1, -1, -1]  # σ = (3, 1, 0), 4 unused


def flex(warmup: bool) -> FlexMatch:
    method = FlexMatch(num_classes=C, knobs={"threshold_warmup": warmup}, total_steps=100, pool_size=8)
    method.load_state_dict({"ema": None, "records": torch.tensor(FLEX_RECORDS)})
    return method


def convex(beta):
    return 0.95 * beta / (2 - beta)


@pytest.mark.parametrize("warmup, beta, mask", [
    (True, [3 / 4, 1 / 4, 0.0], [1, 0, 1, 1]),   # normaliser max(3, 4 unused) = 4
    (False, [1.0, 1 / 3, 0.0], [0, 0, 1, 1]),    # normaliser max σ = 3
])
def test_flexmatch_thresholds_mask_and_loss(warmup, beta, mask):
    method = flex(warmup)
    truth = [0, 1, 1, 0]  # pseudo-labels are 0, 0, 1, 2: rows 0 and 2 right, 1 and 3 wrong
    loss, metrics = method.loss(IDENTITY, make_batch(FLEX_PROBS, index=(4, 5, 6, 0), truth=truth), step=0)
    thresholds = [convex(b) for b in beta]
    for c in range(C):
        assert metrics[f"unsup/threshold_class_{c}"].item() == pytest.approx(thresholds[c], rel=1e-6)
    assert metrics["unsup/threshold"].item() == pytest.approx(sum(thresholds) / C, rel=1e-6)
    assert metrics["unsup/mask_rate"].item() == pytest.approx(sum(mask) / 4)
    supervised, unsup = expected_loss(mask, FLEX_PROBS)
    assert metrics["unsup/loss"].item() == pytest.approx(unsup, rel=1e-5)
    assert loss.item() == pytest.approx(supervised + unsup, rel=1e-5)
    passing = [i for i in range(4) if mask[i]]
    agree = [truth[i] == argmax(FLEX_PROBS[i]) for i in passing]
    assert metrics["unsup/pseudo_accuracy"].item() == pytest.approx(sum(agree) / len(agree))


def test_flexmatch_records_update_only_above_the_fixed_threshold_and_feed_the_next_step():
    method = flex(True)
    # Only row 2 (p = 0.97 > 0.95, class 1) is confident; row 3 (index 0) keeps its old record 0.
    method.loss(IDENTITY, make_batch(FLEX_PROBS, index=(4, 5, 6, 0)), step=0)
    assert method.state_dict()["records"].tolist() == [0, 0, 0, 1, -1, -1, 1, -1]
    # Next step: σ = (3, 2, 0), 3 unused → normaliser 3, β = (1, 2/3, 0).
    _, metrics = method.loss(IDENTITY, make_batch(FLEX_PROBS, index=(4, 5, 7, 0)), step=1)
    assert metrics["unsup/threshold_class_0"].item() == pytest.approx(0.95, rel=1e-6)
    assert metrics["unsup/threshold_class_1"].item() == pytest.approx(convex(2 / 3), rel=1e-6)
    assert metrics["unsup/threshold_class_2"].item() == 0.0


def test_flexmatch_starts_with_zero_thresholds_and_a_repeated_image_takes_its_last_label():
    method = FlexMatch(num_classes=C, knobs={}, total_steps=100, pool_size=8)
    probs = [[0.96, 0.02, 0.02], [0.02, 0.96, 0.02], [0.4, 0.3, 0.3], [0.3, 0.3, 0.4]]
    _, metrics = method.loss(IDENTITY, make_batch(probs, index=(5, 5, 1, 2)), step=0)
    assert metrics["unsup/threshold"].item() == 0.0 and metrics["unsup/mask_rate"].item() == 1.0
    assert method.state_dict()["records"].tolist() == [-1, -1, -1, -1, -1, 1, -1, -1]


# -- FreeMatch ---------------------------------------------------------------------------------

def test_freematch_statistics_mask_and_fairness_after_one_step():
    m, w_f = 0.5, 0.5
    method = FreeMatch(num_classes=C, knobs={"stats_momentum": m, "fairness_weight": w_f}, total_steps=100, pool_size=8)
    loss, metrics = method.loss(IDENTITY, make_batch(), step=0)

    conf = [max(r) for r in PROBS]
    tau = m / C + (1 - m) * sum(conf) / 4
    p_tilde = [m / C + (1 - m) * sum(r[c] for r in PROBS) / 4 for c in range(C)]
    hist = [sum(argmax(r) == c for r in PROBS) / 4 for c in range(C)]
    h_tilde = [m / C + (1 - m) * hist[c] for c in range(C)]
    state = method.state_dict()
    assert state["tau"].item() == pytest.approx(tau, rel=1e-6)
    assert state["p_tilde"].tolist() == pytest.approx(p_tilde, rel=1e-6)
    assert state["label_hist"].tolist() == pytest.approx(h_tilde, rel=1e-6)
    assert metrics["unsup/threshold"].item() == pytest.approx(tau, rel=1e-6)

    thresholds = [tau * p / max(p_tilde) for p in p_tilde]
    mask = [float(max(r) >= thresholds[argmax(r)]) for r in PROBS]
    assert mask == [1.0, 0.0, 1.0, 1.0]  # rows 1 and 3 both have p = 0.4: class 2's threshold is lower
    assert metrics["unsup/mask_rate"].item() == pytest.approx(0.75)

    # Fairness on the masked strong rows 0, 2, 3 (argmax 0, 1, 1: class 2 absent from h̄).
    rows = [softmax(STRONG[i]) for i in range(4) if mask[i]]
    p_bar = [sum(r[c] for r in rows) / len(rows) for c in range(C)]
    h_bar = [sum(argmax(r) == c for r in rows) / len(rows) for c in range(C)]
    a = [p / h for p, h in zip(p_tilde, h_tilde)]
    a = [v / sum(a) for v in a]
    present = [c for c in range(C) if h_bar[c] > 0]
    b = {c: p_bar[c] / h_bar[c] for c in present}
    fairness = sum(a[c] * math.log(b[c] / sum(b.values())) for c in present)
    assert metrics["unsup/fairness_loss"].item() == pytest.approx(fairness, rel=1e-5)

    supervised, unsup = expected_loss(mask)
    assert metrics["unsup/loss"].item() == pytest.approx(unsup, rel=1e-5)
    assert loss.item() == pytest.approx(supervised + unsup + w_f * fairness, rel=1e-5)


# -- SoftMatch ---------------------------------------------------------------------------------

def test_softmatch_running_mean_and_unbiased_variance():
    m = 0.5
    method = SoftMatch(num_classes=C, knobs={"stats_momentum": m, "distribution_alignment": False},
                       total_steps=100, pool_size=8)
    _, metrics = method.loss(IDENTITY, make_batch(), step=0)
    conf = [max(r) for r in PROBS]
    mean = sum(conf) / 4
    var = sum((x - mean) ** 2 for x in conf) / 3  # unbiased
    state = method.state_dict()
    assert state["mu"].item() == pytest.approx(m / C + (1 - m) * mean, rel=1e-6)
    assert state["var"].item() == pytest.approx(m * 1.0 + (1 - m) * var, rel=1e-6)
    assert metrics["unsup/threshold"].item() == pytest.approx(m / C + (1 - m) * mean, rel=1e-6)


def test_softmatch_weights_below_and_above_the_mean():
    # Momentum 0: μ and σ² are this batch's, μ = 0.525, σ² = 0.0225.
    method = SoftMatch(num_classes=C, knobs={"stats_momentum": 0.0, "distribution_alignment": False, "n_sigma": 2.0},
                       total_steps=100, pool_size=8)
    loss, metrics = method.loss(IDENTITY, make_batch(), step=0)
    mu, var = 0.525, 0.0225
    below = math.exp(-(0.4 - mu) ** 2 / (2 * var / 2.0 ** 2))  # ≈ 0.2494
    weights = [1.0, below, 1.0, below]  # 0.7 and 0.6 are above μ: weight 1
    assert below == pytest.approx(0.24935, abs=1e-4)
    assert metrics["unsup/mask_rate"].item() == pytest.approx(sum(weights) / 4, rel=1e-5)
    supervised, unsup = expected_loss(weights)
    assert metrics["unsup/loss"].item() == pytest.approx(unsup, rel=1e-5)
    assert loss.item() == pytest.approx(supervised + unsup, rel=1e-5)


def test_softmatch_uniform_alignment_divides_out_the_running_class_mean():
    m = 0.5
    method = SoftMatch(num_classes=C, knobs={"stats_momentum": m}, total_steps=100, pool_size=8)
    method.loss(IDENTITY, make_batch(), step=0)
    p_model = [m / C + (1 - m) * sum(r[c] for r in PROBS) / 4 for c in range(C)]
    aligned = [[r[c] / p_model[c] for c in range(C)] for r in PROBS]
    aligned = [[v / sum(r) for v in r] for r in aligned]
    state = method.state_dict()
    assert state["p_model"].tolist() == pytest.approx(p_model, rel=1e-6)
    assert state["mu"].item() == pytest.approx(m / C + (1 - m) * sum(max(r) for r in aligned) / 4, rel=1e-6)


# -- Dash --------------------------------------------------------------------------------------

WARMUP_LABELED = [([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [0, 1]), ([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [0, 1])]


def test_dash_warmup_rho0_and_decay():
    knobs = {"unsup_warmup": 0.02, "dash_update_every": 2}  # 2 warm-up steps of 100
    method = Dash(num_classes=C, knobs=knobs, total_steps=100, pool_size=8)
    warm = []
    for step, (labeled, labels) in enumerate(WARMUP_LABELED):
        loss, metrics = method.loss(IDENTITY, make_batch(labeled=labeled, labels=labels), step=step)
        sup = sum(ce(r, y) for r, y in zip(labeled, labels)) / 2
        warm.append(sup)
        assert metrics["unsup/loss"].item() == 0.0 and loss.item() == pytest.approx(sup, rel=1e-6)
        assert math.isnan(metrics["unsup/threshold"].item()) and math.isnan(metrics["unsup/mask_rate"].item())
    rho0 = sum(warm) / 2

    def rho(t):
        return max(1.0001 * 1.27 ** (-t) * rho0, 0.05)

    # Weak-view losses −log max p = 0.357, 0.693, 0.511, 0.916 against ρ ≈ 0.747, 0.588, 0.05.
    probs = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]]
    for step, t, rate in [(2, 0, 0.75), (3, 0, 0.75), (4, 1, 0.5), (42, 20, 0.0)]:
        loss, metrics = method.loss(IDENTITY, make_batch(probs), step=step)
        assert metrics["unsup/threshold"].item() == pytest.approx(rho(t), rel=1e-6)
        mask = [float(-math.log(max(r)) <= rho(t)) for r in probs]
        assert metrics["unsup/mask_rate"].item() == pytest.approx(sum(mask) / 4) == rate
        supervised, unsup = expected_loss(mask, probs)
        assert loss.item() == pytest.approx(supervised + unsup, rel=1e-5)
    assert method.state_dict()["rho0"] == pytest.approx(rho0, rel=1e-6)
    assert rho(20) == 0.05


# -- State round trip --------------------------------------------------------------------------

SPECS = {
    "flexmatch": (FlexMatch, {"threshold": 0.7}),
    "freematch": (FreeMatch, {"stats_momentum": 0.5, "fairness_weight": 0.5}),
    "softmatch": (SoftMatch, {"stats_momentum": 0.5}),
    "dash": (Dash, {"unsup_warmup": 0.02, "dash_update_every": 1}),
}
POOL, ROWS, LROWS = 16, 8, 4


def random_batch(step: int, part: int | None = None) -> Batch:
    """A fixed global batch per step; `part` 0/1 is one worker's half of it."""
    g = torch.Generator().manual_seed(step)
    labeled, labels = torch.randn(LROWS, C, generator=g) * 2, torch.randint(0, C, (LROWS,), generator=g)
    weak, strong = torch.randn(ROWS, C, generator=g) * 3, torch.randn(ROWS, C, generator=g)
    index, truth = torch.randperm(POOL, generator=g)[:ROWS], torch.randint(0, C, (ROWS,), generator=g)
    if part is not None:
        lb, ub = slice(part * LROWS // 2, (part + 1) * LROWS // 2), slice(part * ROWS // 2, (part + 1) * ROWS // 2)
        labeled, labels, weak, strong, index, truth = labeled[lb], labels[lb], weak[ub], strong[ub], index[ub], truth[ub]
    return Batch(labeled=labeled, targets=torch.nn.functional.one_hot(labels, C).float(), weak=weak, strong=strong,
                 index=index, truth=truth)


def build(name: str):
    cls, knobs = SPECS[name]
    return cls(num_classes=C, knobs=knobs, total_steps=100, pool_size=POOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_state_round_trip_gives_the_same_next_step(name):
    model = torch.nn.Linear(C, C)
    with torch.no_grad():
        model.weight.copy_(torch.eye(C))
        model.bias.zero_()
    first = build(name)
    first.setup(model)
    for step in range(3):
        first.loss(model, random_batch(step), step)
        first.after_step(model)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build(name)
    second.setup(model)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    assert second.state_dict()["ema"] is not None
    loss_a, metrics_a = first.loss(model, random_batch(3), 3)
    loss_b, metrics_b = second.loss(model, random_batch(3), 3)
    assert loss_a.item() == loss_b.item()
    assert metrics_a["unsup/threshold"].item() == metrics_b["unsup/threshold"].item()
    # The state matters: a fresh instance takes a different step.
    fresh_loss, fresh_metrics = build(name).loss(model, random_batch(3), 3)
    assert (fresh_loss.item() != loss_a.item()
            or fresh_metrics["unsup/threshold"].item() != metrics_a["unsup/threshold"].item())


# -- Two gloo workers = one worker on the whole batch ------------------------------------------

STEPS = 4


def run_steps(name: str, part: int | None) -> dict:
    method = build(name)
    metrics = [method.loss(IDENTITY, random_batch(step, part), step)[1] for step in range(STEPS)]
    return {"state": method.state_dict(),
            "metrics": [{k: float(v) for k, v in m.items()} for m in metrics]}


def _worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rdzv", rank=rank, world_size=2)
    try:
        torch.save({name: run_steps(name, rank) for name in SPECS}, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _compare_states(name, single, worker):
    for key, value in single.items():
        if key == "ema":
            continue
        if isinstance(value, torch.Tensor):
            assert torch.allclose(worker[key].float(), value.float(), rtol=1e-5, atol=1e-7), (name, key)
        else:
            assert worker[key] == pytest.approx(value, rel=1e-6), (name, key)


def test_two_gloo_workers_keep_the_state_of_one_worker_on_the_whole_batch(tmp_path):
    context = mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("gloo workers did not finish in 60 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in SPECS:
        single = run_steps(name, None)
        for rank in ranks:
            _compare_states(name, single["state"], rank[name]["state"])
        # The halves' masks together are the single worker's mask: the mean rate and loss agree.
        for step in range(STEPS):
            for key in ("unsup/mask_rate", "unsup/loss", "unsup/threshold"):
                expected = single["metrics"][step][key]
                got = (ranks[0][name]["metrics"][step][key] + ranks[1][name]["metrics"][step][key]) / 2
                if math.isnan(expected):
                    assert math.isnan(got), (name, step, key)
                else:
                    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (name, step, key)
    # The comparison is not vacuous: the statistics moved and records were written.
    assert (single_flex := run_steps("flexmatch", None)["state"]["records"]).ge(0).sum() > 0
    assert len(set(single_flex.tolist())) > 2
    assert run_steps("dash", None)["state"]["t"] == STEPS - 1 - 2


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_step_reports_the_same_keys(name):
    """The loop fixes the metric keys from one step and all-reduces them on every rank: warm-up
    and later steps must report the same set, including the shared ones."""
    method = build(name)
    keys = [set(method.loss(IDENTITY, random_batch(step), step)[1]) for step in range(4)]
    assert all(k == keys[0] for k in keys)
    assert {"loss", "accuracy", "sup/loss", "unsup/loss", "unsup/threshold", "unsup/mask_rate",
            "unsup/top_class_fraction", "unsup/pseudo_accuracy"} <= keys[0]

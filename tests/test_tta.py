"""`scoring.tta`: test-time-augmented pool scoring (data distillation, Radosavovic et al. 2018)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selftrain.config import PseudoLabelConfig, ScoringConfig, build_config
from selftrain.data.augment import nhwc_to_nchw, to_model_input
from selftrain.data.decode import decode_image
from selftrain.data.pool import read_pool
from selftrain.errors import ConfigError
from selftrain.methods.pseudo_label import softmax
from selftrain.models.inference import fold_batchnorm
from selftrain.models.registry import build_model
from selftrain.stages import score as score_module
from selftrain.stages.pseudo_label import select_pseudo_labels
from selftrain.stages.score import TeacherScorer, score_pool, tta_log_probs, tta_views
from selftrain.training.loop import load_model, save_model

from conftest import png_bytes

SIZE = 16
SCORING = ScoringConfig(batch_size=128)


# --- the views -------------------------------------------------------------------------------

def test_each_transform_adds_its_views_of_the_same_shape():
    x = torch.rand(2, 3, SIZE, SIZE)
    expected = {(): 1, ("flip",): 2, ("shift",): 5, ("scale",): 3, ("flip", "shift", "scale"): 1 + 1 + 4 + 2}
    for tta, count in expected.items():
        views = tta_views(x, tta)
        assert len(views) == count
        assert all(v.shape == x.shape and v.dtype == x.dtype for v in views)
        assert views[0] is x  # the plain image is always the first view
    flip, *_ = tta_views(x, ["flip"])[1:]
    assert torch.equal(flip, torch.flip(x, [-1]))


def test_shift_views_are_reflect_padded_by_an_eighth_of_the_size():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # 4 // 8 = 0: shifted by 1 px
    up, down, left, right = tta_views(x, ["shift"])[1:]
    grid = lambda rows: torch.tensor(rows, dtype=torch.float32).reshape(1, 1, 4, 4)  # noqa: E731
    assert torch.equal(up, grid([[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [8, 9, 10, 11]]))
    assert torch.equal(down, grid([[4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]))
    assert torch.equal(left, grid([[1, 2, 3, 2], [5, 6, 7, 6], [9, 10, 11, 10], [13, 14, 15, 14]]))
    assert torch.equal(right, grid([[1, 0, 1, 2], [5, 4, 5, 6], [9, 8, 9, 10], [13, 12, 13, 14]]))
    big = torch.rand(1, 3, SIZE, SIZE)  # 16 // 8 = 2 px
    up, down, left, right = tta_views(big, ["shift"])[1:]
    assert torch.equal(up[..., :-2, :], big[..., 2:, :]) and torch.equal(down[..., 2:, :], big[..., :-2, :])
    assert torch.equal(left[..., :-2], big[..., 2:]) and torch.equal(right[..., 2:], big[..., :-2])
    assert torch.equal(right[..., :2], big[..., [2, 1]])  # the uncovered edge mirrors the image


def test_scale_views_zoom_in_and_out_about_the_centre():
    x = torch.rand(1, 3, SIZE, SIZE)
    zoom_in, zoom_out = tta_views(x, ["scale"])[1:]
    crop = round(SIZE / 1.125)  # 14: the centre 14 px blown up to 16
    edge = (SIZE - crop) // 2
    expected_in = torch.nn.functional.interpolate(x[..., edge:edge + crop, edge:edge + crop], size=(SIZE, SIZE),
                                                  mode="bilinear", align_corners=False)
    assert torch.allclose(zoom_in, expected_in)
    small = torch.nn.functional.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True,
                                            align_corners=False)  # 0.875 * 16 = 14, padded 1 px a side
    assert torch.allclose(zoom_out[..., 1:-1, 1:-1], small)
    flat = torch.full((1, 3, SIZE, SIZE), 0.25)
    assert all(torch.allclose(v, flat) for v in tta_views(flat, ["flip", "shift", "scale"]))


# --- the averaging ---------------------------------------------------------------------------

PLAIN_LOGITS = torch.tensor([2.0, 0.5, -1.0])
MIRRORED_LOGITS = torch.tensor([-0.5, 1.5, 0.0])


class KnowsItsMirror(torch.nn.Module):
    """Fixed logits: PLAIN_LOGITS when an image's left half is brighter than its right half,
    MIRRORED_LOGITS when it is darker (as it is in the mirror)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        brighter_left = x[..., :half].mean(dim=(1, 2, 3)) > x[..., half:].mean(dim=(1, 2, 3))
        return torch.where(brighter_left[:, None], PLAIN_LOGITS, MIRRORED_LOGITS)


def scorer_with(model: torch.nn.Module, tta, monkeypatch) -> TeacherScorer:
    monkeypatch.setattr(score_module, "load_model", lambda directory: (model.eval(), {"num_classes": 3}))
    return TeacherScorer("unused", use_gpu=False, amp=False, channels_last=False, tta=tta)


def half_bright_batch(rows: int = 4) -> dict:
    images = np.zeros((rows, SIZE, SIZE, 3), dtype=np.uint8)
    images[:, :, : SIZE // 2] = 200
    return {"path": np.array([f"p{i}" for i in range(rows)], dtype=object), "image": images,
            "error": np.array([""] * (rows - 1) + ["broken"], dtype=object)}


def test_stored_logits_are_the_log_of_the_mean_probability_over_views(monkeypatch):
    out = scorer_with(KnowsItsMirror(), ["flip"], monkeypatch)(half_bright_batch())
    mean = (softmax(PLAIN_LOGITS[None].numpy()) + softmax(MIRRORED_LOGITS[None].numpy()))[0] / 2
    good = out["logits"][:-1]
    np.testing.assert_allclose(good, np.tile(np.log(mean), (3, 1)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(softmax(good), np.tile(mean, (3, 1)), rtol=0, atol=1e-6)
    assert (out["prediction"][:-1] == mean.argmax()).all()
    np.testing.assert_allclose(out["confidence"][:-1], mean.max(), atol=1e-6)
    assert out["prediction"][-1] == -1 and out["confidence"][-1] == 0 and not out["logits"][-1].any()


def test_without_tta_the_logits_are_the_models_own_bit_for_bit(monkeypatch):
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    batch = half_bright_batch()
    batch["image"] = np.random.default_rng(0).integers(0, 256, batch["image"].shape, dtype=np.uint8)
    scorer = scorer_with(model, [], monkeypatch)
    out = scorer(batch)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in scorer.model.modules())  # folded (`models.inference`)
    with torch.inference_mode():  # what TeacherScorer computed before scoring.tta existed, on the same folded model
        before = fold_batchnorm(model)(to_model_input(nhwc_to_nchw(torch.from_numpy(batch["image"])))).float().cpu().numpy()
    before[-1] = 0.0
    np.testing.assert_array_equal(out["logits"], before)
    assert (out["prediction"][:-1] == before[:-1].argmax(axis=1)).all()


def test_a_class_no_view_gives_gets_a_finite_logit():
    certain = lambda x: torch.tensor([[0.0, -1e4]]).expand(len(x), 2)  # noqa: E731
    logits = tta_log_probs(certain, [torch.zeros(2, 3, 4, 4)] * 3)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, torch.tensor([[0.0, float(np.log(1e-12))]]).expand(2, 2))


# --- the pool pass on Ray --------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_model(directory, build_model("resnet18", 10), {"arch": "resnet18", "num_classes": 10,
                                                          "classes": [str(c) for c in range(10)], "image_size": SIZE})
    return str(directory)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """48 random RGB images at the model's size (decoding leaves them as they are), and their
    horizontal mirrors under the same names in another folder."""
    root = tmp_path_factory.mktemp("tta_pools")
    rng = np.random.default_rng(0)
    for name in ("pool", "mirror"):
        (root / name).mkdir()
    for i in range(48):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        image[:, : SIZE // 2] //= 2  # not symmetric on average either
        (root / "pool" / f"{i:02d}.png").write_bytes(png_bytes(image))
        (root / "mirror" / f"{i:02d}.png").write_bytes(png_bytes(np.ascontiguousarray(image[:, ::-1])))
    return root / "pool", root / "mirror"


def scored(pool, model_dir, tta, out) -> pd.DataFrame:
    cfg = SCORING.model_copy(update={"tta": tta})
    table = pd.read_parquet(score_pool(read_pool(str(pool), "image", None), model_dir, cfg, SIZE, out))
    table["name"] = table["path"].map(lambda p: p.rsplit("/", 1)[-1])
    return table.sort_values("name").reset_index(drop=True)


def test_flip_tta_scores_the_mean_of_the_image_and_its_mirror(ray_session, pools, model_dir, tmp_path):
    pool, mirror = pools
    tta = scored(pool, model_dir, ["flip"], tmp_path / "tta")
    plain = scored(pool, model_dir, [], tmp_path / "plain")
    mirrored = scored(mirror, model_dir, [], tmp_path / "mirrored")
    assert len(tta) == len(plain) == len(mirrored) == 48 and (tta["error"] == "").all()
    assert (tta["name"] == plain["name"]).all() and (tta["name"] == mirrored["name"]).all()
    mean = (softmax(np.stack(plain["logits"])) + softmax(np.stack(mirrored["logits"]))) / 2
    assert np.abs(softmax(np.stack(plain["logits"])) - mean).max() > 1e-3  # the mirror does change the scores
    np.testing.assert_allclose(softmax(np.stack(tta["logits"])), mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(tta["confidence"], mean.max(axis=1), rtol=0, atol=1e-5)

    # tta=[]: the teacher's own logits, bit for bit (one batch of 48, as Ray hands it over), from the
    # model as every scorer runs it: batch norm folded (`models.inference`)
    model = fold_batchnorm(load_model(model_dir)[0])
    images = np.stack([decode_image((pool / name).read_bytes(), SIZE) for name in plain["name"]])
    with torch.inference_mode():
        own = model(to_model_input(nhwc_to_nchw(torch.from_numpy(images)))).float().numpy()
    np.testing.assert_array_equal(np.stack(plain["logits"]), own)


# --- provenance and config -------------------------------------------------------------------

def test_pseudo_labels_name_the_views_that_scored_them(ray_session, tmp_path):
    logits = np.log(np.tile([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]], (10, 1)))
    table = pd.DataFrame({"path": [f"p{i}" for i in range(20)], "label": -1, "error": "",
                          "logits": list(logits), "prediction": logits.argmax(axis=1), "confidence": 0.7})
    pq.write_table(pa.Table.from_pandas(table), tmp_path / "scores.parquet")
    for tta, name in ([["flip", "shift"], "plain+flip+shift"], [[], "plain"]):
        meta = {"iteration": 1, "threshold": 0.5, "temperature": 1.0, "tta": tta}
        directory, _, rows = select_pseudo_labels(str(tmp_path / "scores.parquet"), PseudoLabelConfig(threshold=0.5),
                                                  ["a", "b", "c"], tmp_path / name, seed=0, meta=meta, pool_root="")
        labels = pd.read_parquet(directory)
        assert rows == len(labels) == 20 and (labels["tta"] == name).all()
        soft = np.sort(np.stack(labels["soft_target"]), axis=1)  # softmax(log p) = p: no change needed
        np.testing.assert_allclose(soft, np.tile([0.1, 0.2, 0.7], (20, 1)), atol=1e-6)


def test_tta_config_refuses_repeats_and_unknown_transforms():
    assert build_config({}).scoring.tta == []
    assert build_config({"scoring": {"tta": ["shift", "flip"]}}).scoring.tta == ["shift", "flip"]
    with pytest.raises(ConfigError, match=r"scoring\.tta lists 'flip' more than once"):
        build_config({"scoring": {"tta": ["flip", "flip"]}})
    with pytest.raises(ConfigError) as err:
        build_config({"scoring": {"tta": ["flip", "rotate"]}})
    assert "scoring.tta.1: Input should be 'flip', 'shift' or 'scale' (got 'rotate')" in str(err.value)

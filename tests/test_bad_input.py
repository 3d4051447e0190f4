"""Bad input, each kind with what selftrain does about it (README, "Bad input"): real files on
disk, listed, read and decoded by the real code, through Ray Data where the code runs there.

One hostile folder pool is read once (listing, reading, decoding: one Ray Data pass) for the
cases that live in a folder pool: decompression bombs, odd image modes, symlinks, permissions,
names that are not UTF-8 and a Parquet file among the images.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from selftrain.config import PseudoLabelConfig
from selftrain.data import decode
from selftrain.data import pool as pool_module
from selftrain.data.decode import READ_ATTEMPTS, decode_batch, local_id, read_file_bytes
from selftrain.data.listing import locate
from selftrain.data.pool import list_pool_files, read_pool
from selftrain.errors import DataError, PseudoLabelError
from selftrain.models.registry import build_model
from selftrain.stages.pool_index import index_pool
from selftrain.stages.pseudo_label import PoolStats, check_usable, select_pseudo_labels, stats_metrics
from selftrain.stages.score import TeacherScorer, scored
from selftrain.training.loop import save_model

from conftest import png_bytes

SIZE = 8


def _chmod_denies() -> bool:
    """Whether chmod 000 stops this process reading a file: not as root (nor with the
    CAP_DAC_OVERRIDE capability), which reads whatever the mode says."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
            return False
        except PermissionError:
            return True


CHMOD_DENIES = _chmod_denies()
GOOD = png_bytes(np.full((SIZE, SIZE), 90, np.uint8))
LIMIT = Image.MAX_IMAGE_PIXELS  # PIL's default, as the Ray workers have it


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _modes() -> dict[str, tuple[bytes, list[list[int]]]]:
    """File name -> (bytes, the RGB pixels (0,0) and (1,1) as computed here by hand)."""
    sixteen = np.full((SIZE, SIZE), 30000, np.uint16)
    sixteen[1, 1] = 65535
    cmyk = (100, 0, 50, 20)  # PIL's CMYK -> RGB: (255 - c) * (255 - k) / 255 per channel
    from_cmyk = [round((255 - v) * (255 - cmyk[3]) / 255) for v in cmyk[:3]]
    palette = Image.new("P", (SIZE, SIZE), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 1), 1)
    red, blue = Image.new("RGB", (SIZE, SIZE), (255, 0, 0)), Image.new("RGB", (SIZE, SIZE), (0, 0, 255))
    return {
        "i16.png": (_encode(Image.fromarray(sixteen)), [[117] * 3, [255] * 3]),  # round(30000 / 257) = 117
        "cmyk.jpg": (_encode(Image.new("CMYK", (SIZE, SIZE), cmyk), "JPEG", quality=100), [from_cmyk] * 2),
        # index 0 (red) is the transparent one: alpha is dropped, the stored colour kept
        "palette.png": (_encode(palette, transparency=0), [[255, 0, 0], [0, 0, 255]]),
        "animated.gif": (_encode(red, "GIF", save_all=True, append_images=[blue]), [[255, 0, 0]] * 2),
        "animated.png": (_encode(red, "PNG", save_all=True, append_images=[blue]), [[255, 0, 0]] * 2),
        "la.png": (_encode(Image.new("LA", (SIZE, SIZE), (77, 10))), [[77] * 3] * 2),
        "rgba.png": (_encode(Image.new("RGBA", (SIZE, SIZE), (10, 20, 30, 0))), [[10, 20, 30]] * 2),
    }


@pytest.fixture(scope="module")
def hostile_pool(ray_session, tmp_path_factory):
    """(root, {pool id: row}) for a folder pool of every bad kind beside good images, read once."""
    root = tmp_path_factory.mktemp("hostile") / "pool"
    for name, data in {
        "good/a.png": GOOD, "good/b.png": GOOD,
        # 1-bit images: a few KB of PNG, hundreds of millions of pixels once decoded
        "bomb/over_twice.png": _encode(Image.new("1", (14000, 14000))),  # PIL itself refuses it
        "bomb/over_limit.png": _encode(Image.new("1", (10000, 9000))),  # PIL would only warn
        "bomb/neighbour.png": GOOD,
        **{f"modes/{name}": data for name, (data, _) in _modes().items()},
        "links/real.png": GOOD, "perm/denied.png": GOOD, "perm/locked/hidden_from_listing.png": GOOD,
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.symlink("..", root / "links" / "loop")  # back to the pool root
    os.symlink(root / "links" / "missing.png", root / "links" / "dangling.png")
    os.symlink("self.png", root / "links" / "self.png")  # a link to itself
    os.symlink("../good", root / "links" / "alias")  # a folder of the pool, linked: followed
    names = os.fsencode(root / "names")
    os.makedirs(names + b"/\xfe dir")
    for path in (names + b"/\xff.png", names + b"/\xfe dir/x.png"):
        with open(path, "wb") as handle:
            handle.write(GOOD)
    pq.write_table(pa.table({"image": [png_bytes(np.full((SIZE, SIZE), v, np.uint8)) for v in (10, 20)]}),
                   root / "mixed.parquet")
    os.chmod(root / "perm" / "denied.png", 0)
    os.chmod(root / "perm" / "locked", 0)
    try:
        dataset = read_pool(str(root), "image", None).map_batches(
            decode_batch, fn_kwargs={"size": SIZE}, batch_size=64, num_cpus=0.5).materialize()
        table = dataset.select_columns(["path", "error", "image"]).to_pandas()
    finally:
        os.chmod(root / "perm" / "locked", 0o755)
        os.chmod(root / "perm" / "denied.png", 0o644)
    assert table["path"].is_unique
    return root, dataset, {row.path: row for row in table.itertuples()}


def test_decompression_bombs_are_skipped_and_named_and_their_neighbour_survives(hostile_pool):
    root, _, rows = hostile_pool
    over_twice, over_limit = rows[str(root / "bomb/over_twice.png")], rows[str(root / "bomb/over_limit.png")]
    assert over_twice.error.startswith(f"decompression bomb: 196000000 pixels, over the limit of {LIMIT} pixels "
                                       "(PIL Image.MAX_IMAGE_PIXELS)")
    assert over_limit.error.startswith(f"decompression bomb: 90000000 pixels (10000x9000), over the limit of "
                                       f"{LIMIT} pixels")
    neighbour = rows[str(root / "bomb/neighbour.png")]
    assert neighbour.error == "" and (np.stack(neighbour.image) == 90).all()


@pytest.mark.parametrize("name", list(_modes()))
def test_image_modes_decode_to_the_rgb_values_computed_by_hand(hostile_pool, name):
    root, _, rows = hostile_pool
    row = rows[str(root / "modes" / name)]
    assert row.error == ""
    image = np.asarray(row.image.tolist(), dtype=np.int64)
    assert image.shape == (SIZE, SIZE, 3)
    expected = _modes()[name][1]
    tolerance = 2 if name.endswith(".jpg") else 0  # JPEG rounds in its colour transform
    assert np.abs(image[0, 0] - expected[0]).max() <= tolerance, image[0, 0]
    assert np.abs(image[1, 1] - expected[1]).max() <= tolerance, image[1, 1]


def test_symlink_loops_and_dangling_links_are_named_and_every_good_file_is_read(hostile_pool):
    root, _, rows = hostile_pool
    links = root / "links"
    assert rows[str(links / "loop")].error == (f"skipped: symlink loop: {links / 'loop'} leads back to {root}, "
                                               "which is listed already")
    assert rows[str(links / "dangling.png")].error == f"unreadable file: dangling symlink to {links / 'missing.png'}"
    assert rows[str(links / "self.png")].error == "unreadable file: symlink loop (self.png -> self.png)"
    for good in ("links/real.png", "links/alias/a.png", "links/alias/b.png", "good/a.png", "good/b.png"):
        assert rows[str(root / good)].error == "", good
    # The listing ended (a loop followed would list forever) with every good image exactly once
    # per path that leads to it, and nothing else read: every other row says why.
    readable = sorted(p for p, row in rows.items() if not row.error and "#row=" not in p and "/perm/" not in p)
    assert readable == sorted([str(root / p) for p in ("good/a.png", "good/b.png", "bomb/neighbour.png",
                                                       "links/real.png", "links/alias/a.png", "links/alias/b.png",
                                                       *(f"modes/{m}" for m in _modes()))]
                              + [f"file://{root}/names/%FF.png", f"file://{root}/names/%FE%20dir/x.png"])


@pytest.mark.skipif(not CHMOD_DENIES, reason="running as root (or with CAP_DAC_OVERRIDE): chmod 000 cannot deny "
                                            "this process a read, so there is no unreadable file to test; run the "
                                            "suite as a normal user")
def test_unreadable_permissions_are_named_not_fatal(hostile_pool):
    root, _, rows = hostile_pool
    assert rows[str(root / "perm/denied.png")].error == "unreadable file: Permission denied"
    assert rows[str(root / "perm/locked")].error == ("skipped: unreadable folder, its files are not listed: "
                                                     "Permission denied")
    assert rows[str(root / "good/a.png")].error == ""  # the pass went on
    locked = root / "perm" / "locked"  # the pool's own folder: said at once, not "no image files"
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match=f"data.unlabeled: cannot list {locked}: Permission denied"):
            read_pool(str(locked), "image", None)
    finally:
        locked.chmod(0o755)


def test_names_that_are_not_utf8_are_read_and_written_to_parquet(hostile_pool, tmp_path):
    root, dataset, rows = hostile_pool
    ids = [f"file://{root}/names/%FF.png", f"file://{root}/names/%FE%20dir/x.png"]
    assert ids == [local_id(os.fsdecode(os.fsencode(root) + b"/names/\xff.png")),
                   local_id(os.fsdecode(os.fsencode(root) + b"/names/\xfe dir/x.png"))]
    for file_id in ids:
        assert rows[file_id].error == "" and (np.stack(rows[file_id].image) == 90).all()
        assert read_file_bytes(file_id) == GOOD  # the id opens the very file (training reads by id)
    dataset.select_columns(["path", "error"]).write_parquet(str(tmp_path / "scores"))
    written = pd.read_parquet(tmp_path / "scores")
    assert set(ids) <= set(written["path"]) and len(written) == len(rows)


def test_a_mixed_pool_reads_its_images_and_its_parquet_rows(hostile_pool):
    root, _, rows = hostile_pool
    for row, value in ((0, 10), (1, 20)):
        parquet_row = rows[f"{root / 'mixed.parquet'}#row={row}"]
        assert parquet_row.error == "" and (np.stack(parquet_row.image) == value).all()
    assert rows[str(root / "good/a.png")].error == ""
    assert not any(row.error.startswith("skipped: a") for row in rows.values())  # nothing left out for its kind


def test_a_parquet_file_cut_in_half_stops_with_its_name(ray_session, tmp_path):
    images = [png_bytes(np.full((SIZE, SIZE), v, np.uint8)) for v in range(40)]
    pq.write_table(pa.table({"image": images}), tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    first = tmp_path / "first"  # the file the driver looks at first: named before any task runs
    first.mkdir()
    (first / "a_cut.parquet").write_bytes(data[: len(data) // 2])
    (first / "b.parquet").write_bytes(data)
    with pytest.raises(DataError, match=rf"Parquet file {first / 'a_cut.parquet'} cannot be read \(.*\); "
                                        "rewrite it or move it out of the pool"):
        read_pool(str(first), "image", None)
    later = tmp_path / "later"  # found by a Ray task in the pass: the pass stops, naming it
    later.mkdir()
    (later / "a.parquet").write_bytes(data)
    (later / "b_cut.parquet").write_bytes(data[: len(data) // 2])
    (later / "c.png").write_bytes(GOOD)
    with pytest.raises(DataError, match=rf"^data.unlabeled: Parquet file {later / 'b_cut.parquet'} cannot be read "
                                        r"\(.+\); a file cut short loses the footer"):
        index_pool(str(later), "image", None, SIZE, tmp_path / "index", seed=0)


def test_nan_and_inf_logits_are_never_pseudo_labels_and_are_counted_by_name(ray_session, tmp_path):
    logits = np.array([[4, 0, 0], [0, 4, 0], [np.nan, 0, 0], [np.inf, 0, 0], [0, -np.inf, 1], [0, 0, 4]],
                      dtype=np.float32)
    prediction, confidence = scored(logits)
    assert prediction.tolist() == [0, 1, -1, -1, -1, 2] and np.isnan(confidence[2:5]).all()
    scores = pd.DataFrame({"path": [f"p{i}" for i in range(6)], "label": -1, "error": "", "logits": list(logits),
                           "prediction": prediction, "confidence": confidence})
    pq.write_table(pa.Table.from_pandas(scores), tmp_path / "scores.parquet")
    cfg = PseudoLabelConfig(threshold=0.0, balance=False)  # 0.0: every finite row is kept
    directory, stats, rows = select_pseudo_labels(str(tmp_path / "scores.parquet"), cfg, ["a", "b", "c"],
                                                  tmp_path / "one", seed=0, meta={}, pool_root="")
    assert sorted(pd.read_parquet(directory)["path"]) == ["p0", "p1", "p5"] and rows == 3
    assert (stats.scored, stats.non_finite_count, stats.rejected_count) == (3, 3, 0)
    assert [r["path"] for r in stats.non_finite] == ["p2", "p3", "p4"]
    assert stats.non_finite[0]["reason"] == "teacher logits NaN or infinite: not pseudo-labelled"
    assert stats_metrics(stats, rows, ["a", "b", "c"])["pseudo/non_finite_logits"] == 3

    # A teacher that gives NaN for every image: the stage stops, saying so (same stats, none finite).
    nothing = PoolStats(kept_per_class=[0, 0, 0], non_finite=stats.non_finite, non_finite_count=3)
    with pytest.raises(PseudoLabelError, match=r"no pool image could be scored \(0 unreadable; the teacher gave "
                                               r"NaN or infinite logits for 3 images, e.g. p2, p3, p4"):
        check_usable(nothing, cfg, ["a", "b", "c"])


def test_a_teacher_whose_outputs_are_nan_scores_no_prediction(tmp_path):
    model = build_model("cnn_tiny", 3)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_model(tmp_path, model, {"arch": "cnn_tiny", "num_classes": 3, "classes": ["a", "b", "c"], "image_size": SIZE})
    scorer = TeacherScorer(str(tmp_path), use_gpu=False, amp=False, channels_last=False)
    out = scorer({"image": np.zeros((2, SIZE, SIZE, 3), np.uint8), "error": np.array(["", "empty file"], dtype=object)})
    assert out["prediction"].tolist() == [-1, -1]
    assert np.isnan(out["confidence"][0]) and out["confidence"][1] == 0.0  # NaN: counted apart from unreadable


def test_a_failed_read_is_retried_before_the_file_is_called_unreadable(ray_session, tmp_path):
    for name in ("good.png", "flaky.png", "broken.png", "denied.png"):
        (tmp_path / name).write_bytes(GOOD)
    failures = {str(tmp_path / "flaky.png"): (READ_ATTEMPTS - 1, errno.EIO),  # good by the last attempt
                str(tmp_path / "broken.png"): (100, errno.EIO),
                str(tmp_path / "denied.png"): (100, errno.EACCES)}  # says what the file is: not retried
    # Defined here, not at module level: Ray pickles it by value (the workers cannot import tests).
    def flaky_read_files(batch, location, column, failures):
        """In the Ray task: the real `pool._read_files`, with `open` in `selftrain.data.decode` (where
        every local read opens its file) failing a path's first n opens with the given errno."""
        import builtins

        opened: dict[str, int] = {}

        def flaky_open(file, *args, **kwargs):
            name = os.fsdecode(file)
            opened[name] = opened.get(name, 0) + 1
            times, code = failures.get(name, (0, 0))
            if opened[name] <= times:
                raise OSError(code, os.strerror(code), name)
            return builtins.open(file, *args, **kwargs)

        with mock.patch.object(decode, "open", flaky_open, create=True), mock.patch.object(decode, "RETRY_DELAY_S", 0.01):
            for out in pool_module._read_files(batch, location, column):
                out["opens"] = np.array([opened.get(p, 0) for p in out["path"]])
                yield out

    rows = list_pool_files(locate(str(tmp_path))).map_batches(
        flaky_read_files, batch_size=None, num_cpus=0.5,
        fn_kwargs={"location": locate(str(tmp_path)), "column": "image", "failures": failures},
    ).map_batches(decode_batch, fn_kwargs={"size": SIZE}, num_cpus=0.5).to_pandas().set_index("path")
    outcome = {Path(p).name: (row.error, row.opens) for p, row in rows.iterrows()}
    assert outcome == {
        "good.png": ("", 1),
        "flaky.png": ("", READ_ATTEMPTS),
        "broken.png": (f"unreadable file: Input/output error (after {READ_ATTEMPTS} attempts)", READ_ATTEMPTS),
        "denied.png": ("unreadable file: Permission denied", 1),
    }
    assert (np.stack(rows.loc[str(tmp_path / "flaky.png"), "image"]) == 90).all()

    # The labeled set's and the training stream's reads (`read_file_bytes`), in this process.
    calls = []

    def flaky_open(file, *args, **kwargs):
        calls.append(file)
        if len(calls) < READ_ATTEMPTS:
            raise OSError(errno.ESTALE, "Stale file handle", file)
        return open(file, *args, **kwargs)

    with mock.patch.object(decode, "open", flaky_open, create=True), mock.patch.object(decode, "RETRY_DELAY_S", 0.01):
        assert read_file_bytes(str(tmp_path / "good.png")) == GOOD and len(calls) == READ_ATTEMPTS

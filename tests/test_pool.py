"""The unlabeled pool read through pyarrow filesystems, listed in Ray tasks, and bad pools."""

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selftrain.config import ScoringConfig
from selftrain.data import listing
from selftrain.data.listing import glob_regex
from selftrain.data import pool as pool_module
from selftrain.data.pool import read_pool
from selftrain.errors import DataError
from selftrain.models.registry import build_model
from selftrain.stages.score import check_scores, score_pool
from selftrain.training.loop import save_model

from conftest import png_bytes, write_corrupt_files

GOOD = png_bytes(np.full((8, 8), 90, np.uint8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, build_model("resnet18", 3), {"arch": "resnet18", "num_classes": 3,
                                                         "classes": ["a", "b", "c"], "image_size": 8})
    return str(directory)


def _tree(root, files):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _paths(dataset) -> list[str]:
    return sorted(dataset.select_columns(["path"]).to_pandas()["path"])  # tiny test pools only


def test_glob_matches_like_the_shell():
    assert glob_regex("**/*.png").match("a/b/x.png") and glob_regex("**/*.png").match("x.png")
    assert not glob_regex("*.png").match("a/x.png")
    assert glob_regex("s[0-9]/?.jp*g").match("s3/x.jpeg") and not glob_regex("s[!0-9]/x.jpg").match("s3/x.jpg")


def test_a_relative_glob_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Not the filesystem root (which a pool of '**/*.png' once listed whole)."""
    monkeypatch.chdir(tmp_path)
    for spec, root, pattern in (("**/*.png", tmp_path, "**/*.png"), ("pool/*.jpg", tmp_path / "pool", "*.jpg")):
        (tmp_path / "pool").mkdir(exist_ok=True)
        location = listing.locate(spec)
        assert (location.root, location.pattern.pattern) == (str(root), glob_regex(pattern).pattern)
    assert listing.locate("/*.png").root == "/"


def test_file_uri_pool_lists_nested_folders_and_globs(ray_session, tmp_path):
    root = _tree(tmp_path / "pool", {
        "top.png": GOOD, "a/1.png": GOOD, "a/b/2.jpg": GOOD, "c/3.PNG": GOOD,
        "c/notes.txt": b"not a pool file", "c/.hidden.png": GOOD, "a/_SUCCESS": b"",
    })
    expected = [str(root / p) for p in ("a/1.png", "a/b/2.jpg", "c/3.PNG", "top.png")]
    # Every file is read or named with the reason it was not: nothing disappears silently.
    skipped = {str(root / "c/notes.txt"): "skipped: unsupported extension '.txt'",
               str(root / "c/.hidden.png"): "skipped: hidden or marker file",
               str(root / "a/_SUCCESS"): "skipped: hidden or marker file"}
    for spec in (f"file://{root}", str(root)):
        rows = read_pool(spec, "image", None).select_columns(["path", "error"]).to_pandas()
        assert sorted(rows.loc[rows["error"] == "", "path"]) == expected
        reasons = dict(zip(rows.loc[rows["error"] != "", "path"], rows.loc[rows["error"] != "", "error"]))
        assert sorted(reasons) == sorted(skipped)
        assert all(reasons[path].startswith(why) for path, why in skipped.items())
    globbed = read_pool(f"file://{root}/**/*.png", "image", None).select_columns(["path", "error"]).to_pandas()
    assert sorted(globbed.loc[globbed["error"] == "", "path"]) == [str(root / "a/1.png"), str(root / "top.png")]
    assert globbed.loc[globbed["error"] != "", "path"].tolist() == [str(root / "c/.hidden.png")]  # named
    assert _paths(read_pool(f"{root}/a/*", "image", None)) == [str(root / "a/1.png"), str(root / "a/_SUCCESS")]
    rows = read_pool(f"file://{root}/a/b/2.jpg", "image", None).to_pandas()
    assert rows["path"].tolist() == [str(root / "a/b/2.jpg")] and rows["bytes"][0] == GOOD


def test_parquet_folder_uri_streams_rows_with_stable_ids(ray_session, tmp_path):
    images = [png_bytes(np.full((8, 8), v % 256, np.uint8)) + bytes([v % 7]) for v in range(600)]  # > 1 batch
    (tmp_path / "pq" / "part").mkdir(parents=True)
    pq.write_table(pa.table({"img": images[:500]}), tmp_path / "pq" / "part" / "0.parquet")
    pq.write_table(pa.table({"img": images[500:]}), tmp_path / "pq" / "1.parquet")
    (tmp_path / "pq" / "_SUCCESS").write_bytes(b"")  # as Spark leaves it
    (tmp_path / "pq" / "stray.png").write_bytes(GOOD)  # a mixed pool: read whole, the image too
    rows = read_pool(f"file://{tmp_path / 'pq'}", "img", None).to_pandas().set_index("path")
    assert len(rows) == 602
    assert rows.loc[str(tmp_path / "pq" / "stray.png"), "error"] == ""
    assert rows.loc[str(tmp_path / "pq" / "stray.png"), "bytes"] == GOOD
    assert rows.loc[str(tmp_path / "pq" / "_SUCCESS"), "error"] == "skipped: hidden or marker file"
    assert (rows["error"] != "").sum() == 1
    assert rows.loc[f"{tmp_path / 'pq' / 'part' / '0.parquet'}#row=499", "bytes"] == images[499]
    assert rows.loc[f"{tmp_path / 'pq' / '1.parquet'}#row=99", "bytes"] == images[599]
    with pytest.raises(DataError, match=r"pq/1.parquet has no column 'image' \(columns: img\); set data.parquet_image_column"):
        read_pool(f"file://{tmp_path / 'pq'}", "image", None)


def test_unreachable_and_empty_pools_are_named_at_once(ray_session, tmp_path):
    missing = f"file://{tmp_path}/no-such-folder"
    with pytest.raises(DataError, match=f"path does not exist: {missing}"):
        read_pool(missing, "image", None)
    bucket = f"s3://selftrain-no-such-bucket-{uuid.uuid4().hex[:12]}/pool"
    with pytest.raises(DataError, match=f"cannot reach {bucket}: .+"):  # the reason from pyarrow
        read_pool(bucket, "image", None)
    with pytest.raises(DataError, match="cannot reach unknown-scheme://x/pool: Unrecognized filesystem type"):
        read_pool("unknown-scheme://x/pool", "image", None)
    _tree(tmp_path / "texts", {"a/readme.txt": b"x", "b.csv": b"y"})
    with pytest.raises(DataError, match=f"no image files \\(or Parquet\\) under file://{tmp_path}/texts"):
        read_pool(f"file://{tmp_path}/texts", "image", None)
    with pytest.raises(DataError, match=r"the glob '.+/texts/\*\*/\*.jpg' matches no image files"):
        read_pool(f"{tmp_path}/texts/**/*.jpg", "image", None)


def test_a_pool_found_empty_only_by_the_pass_stops(ray_session, tmp_path, model_dir, monkeypatch):
    # More non-image entries than the driver's probe looks at: only the streamed pass can tell.
    monkeypatch.setattr(listing, "PROBE_LIMIT", 2)
    _tree(tmp_path / "pool", {f"d{i}/notes{i}.txt": b"x" for i in range(4)})
    pool = read_pool(str(tmp_path / "pool"), "image", None)
    with pytest.raises(DataError, match=r"data.unlabeled=.+/pool: the pool holds no image files \(nothing was "
                                        r"scored; 4 other files were skipped"):
        score_pool(pool, model_dir, ScoringConfig(), 8, tmp_path / "out",
                   pool_name=f"data.unlabeled={tmp_path / 'pool'}")


def test_a_mostly_unreadable_pool_stops_naming_examples_and_keeps_the_scores(ray_session, tmp_path, model_dir):
    bad = write_corrupt_files(tmp_path / "pool" / "bad")
    _tree(tmp_path / "pool", {"good/1.png": GOOD, "good/2.png": GOOD})
    pool = f"file://{tmp_path / 'pool'}"
    with pytest.raises(DataError) as caught:
        score_pool(read_pool(pool, "image", None), model_dir, ScoringConfig(max_rejected_fraction=0.5),
                   8, tmp_path / "strict")
    message = str(caught.value)
    assert "3 of 5 pool images (60.0%) are unreadable, more than scoring.max_rejected_fraction=0.5" in message
    assert all(path in message for path in bad) and "empty file" in message
    kept = pd.read_parquet(tmp_path / "strict" / "scores")
    assert len(kept) == 5 and (kept["error"] != "").sum() == 3
    # A limit above 3/5 lets the same scores through (checked on the Parquet kept above).
    assert check_scores(str(tmp_path / "strict" / "scores"), 0.6, "pool") == (5, 3)


def test_a_parquet_row_is_read_from_its_row_group_by_id(tmp_path):
    from selftrain.data.decode import read_image_ref

    values = [bytes([i % 256, i // 256]) for i in range(1000)]
    pq.write_table(pa.table({"image": values}), tmp_path / "pool.parquet", row_group_size=128)
    for row in (0, 127, 128, 129, 500, 999):
        assert read_image_ref(f"{tmp_path / 'pool.parquet'}#row={row}") == values[row]
        assert read_image_ref(f"file://{tmp_path / 'pool.parquet'}#row={row}") == values[row]
    assert read_image_ref(f"file://{tmp_path / 'pool.parquet'}") == (tmp_path / "pool.parquet").read_bytes()


def test_listing_units_are_bounded_and_share_out_every_entry_exactly_once(tmp_path):
    """The pool is cut into about 2 x `units` units whatever its size. Fewer sub-folders than
    units: each is cut into shards that each list the tree and keep their share. More: they are
    grouped. Every entry, the ones not read included, is in exactly one unit."""
    root = _tree(tmp_path / "pool", {**{f"only/{i % 7}/{i}.png": GOOD for i in range(300)},
                                     "only/notes.txt": b"", **{f"top{i}.png": GOOD for i in range(1100)}})
    os.symlink(root / "only" / "missing.png", root / "only" / "dangling.png")
    location = listing.locate(str(root))
    units = listing.list_top_level({"root": location.root}, location, units=8)
    folder_units = [u for u in units if u["folders"]]
    assert [(u["folders"], u["shard"], u["shards"]) for u in folder_units] == [([str(root / "only")], i, 8)
                                                                               for i in range(8)]
    chunks = [len(u["files"]) for u in units if not u["folders"]]
    assert chunks == [512, 512, 76]  # at least FILES_PER_ROW names a chunk
    assert [len(u["files"]) for u in listing.list_top_level({"root": location.root}, location, units=2)
            if not u["folders"]] == [550, 550]  # at most `units` chunks
    shares = [listing.list_below(u, location) for u in folder_units]
    whole = listing.list_below({**folder_units[0], "shard": 0, "shards": 1}, location)
    assert len(whole) == 302
    assert sorted(r["file"] for share in shares for r in share) == sorted(r["file"] for r in whole)  # no repeats
    assert min(len(share) for share in shares) > 302 / 8 / 2  # each shard does its part of the reading
    skips = {Path(r["file"]).name: r["skip"] for share in shares for r in share if r["skip"]}
    assert skips == {"notes.txt": "skipped: unsupported extension '.txt' (images: "
                     + ", ".join(listing.IMAGE_EXTENSIONS) + "; or parquet)",
                     "dangling.png": f"unreadable file: dangling symlink to {root / 'only' / 'missing.png'}"}

    many = _tree(tmp_path / "many", {f"s{i:02d}/{j}.png": GOOD for i in range(20) for j in range(3)})
    location = listing.locate(str(many))
    units = listing.list_top_level({"root": location.root}, location, units=8)
    assert [len(u["folders"]) for u in units] == [3, 3, 3, 3, 3, 3, 2]  # 20 sub-folders in groups
    files = [r["file"] for u in units for r in listing.list_below(u, location)]
    assert sorted(files) == sorted(str(p) for p in many.rglob("*.png")) and len(files) == 60


def test_a_pool_of_more_sub_folders_than_units_is_read_whole_once(ray_session, tmp_path):
    """The 2-CPU test Ray wants MIN_UNITS (64) units: 100 sub-folders are read in groups of 2,
    each group's folders one after the other in one task; beside them a chunk of top-level files."""
    assert pool_module.MIN_UNITS < 100
    root = _tree(tmp_path / "pool", {**{f"s{i:03d}/{j}.png": GOOD for i in range(100) for j in range(2)},
                                     "top.png": GOOD})
    rows = read_pool(str(root), "image", None).select_columns(["path", "error", "bytes"]).to_pandas()
    assert sorted(rows["path"]) == sorted(str(p) for p in root.rglob("*.png")) and len(rows) == 201
    assert (rows["error"] == "").all() and (rows["bytes"] == GOOD).all()


def test_an_object_store_folder_is_sharded_alike(tmp_path):
    """The pyarrow branch (object stores): a filesystem that is not the local one, here a
    SubTreeFileSystem over a folder, lists each shard's files from the prefix's listing."""
    import pyarrow.fs as pafs

    _tree(tmp_path, {**{f"pool/only/{i % 5}/{i}.png": GOOD for i in range(120)}, "pool/top.png": GOOD})
    location = listing.PoolLocation("sub://pool", pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()),
                                    "pool", False, None, "sub://")
    units = listing.list_top_level({"root": "pool"}, location, units=4)
    assert [(u["folders"], u["shard"], u["shards"]) for u in units if u["folders"]] == [(["pool/only"], i, 4)
                                                                                       for i in range(4)]
    files = [r["file"] for u in units for r in listing.list_below(u, location)]
    assert sorted(files) == sorted(["pool/top.png"] + [f"pool/only/{i % 5}/{i}.png" for i in range(120)])
    assert len(files) == 121  # each once


def _footer_actors():
    """FooterReader actors this Ray has ever started (dead ones stay in the GCS table)."""
    import ray

    return sum(1 for actor in ray._private.state.actors().values() if actor["ActorClassName"] == "FooterReader")


def test_platform_parquet_reads_start_no_footer_actor(ray_session, tmp_path, monkeypatch):
    """The platform's Parquet folders are read through Ray's V1 datasource: all rows, no
    FooterReader actor (Ray 2.60's default V2 read starts 32 for every read; here, one, so the
    count is seen to move), and the user's DataContext switch is left as it was. The statistics
    passes read one block per file."""
    import ray.data

    from selftrain.data.parquet import read_parquet, read_parquet_per_file

    for part in range(3):
        pd.DataFrame({"a": np.arange(10) + 10 * part}).to_parquet(tmp_path / f"{part}.parquet")
    context = ray.data.DataContext.get_current()
    assert context.use_datasource_v2  # Ray 2.60's default, which the helper must not change
    before = _footer_actors()
    rows = read_parquet(str(tmp_path), num_cpus=0.5).map_batches(lambda b: {"a": b["a"] * 2}).to_pandas()
    assert sorted(rows["a"]) == list(range(0, 60, 2))
    assert _footer_actors() == before and context.use_datasource_v2
    # The statistics passes: one block (one task downstream) per file, where Ray would make 4 here.
    assert read_parquet(str(tmp_path)).materialize().num_blocks() > 3
    assert read_parquet_per_file(str(tmp_path)).materialize().num_blocks() == 3
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    assert len(ray.data.read_parquet(str(tmp_path)).map_batches(lambda b: b).to_pandas()) == 30
    assert _footer_actors() == before + 1

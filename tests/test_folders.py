import numpy as np
import pytest

from selftrain.data.folders import load_labeled_sets
from selftrain.errors import DataError

from conftest import copy_tree, png_bytes, write_corrupt_files


def _class_folders(root, classes, per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(png_bytes(np.full((6, 6), i * 40, np.uint8)))
    return root


def test_missing_path_is_named(tmp_path):
    labeled = _class_folders(tmp_path / "l", ["a", "b"])
    with pytest.raises(DataError, match=f"data.test: path does not exist: {tmp_path / 'nope'}"):
        load_labeled_sets(str(labeled), str(tmp_path / "nope"), 8)


def test_class_mismatch_names_both_sides(tmp_path):
    labeled = _class_folders(tmp_path / "l", ["cat", "dog"])
    test = _class_folders(tmp_path / "t", ["cat", "fox"])
    with pytest.raises(DataError, match=r"only in labeled: \['dog'\]; only in test: \['fox'\]"):
        load_labeled_sets(str(labeled), str(test), 8)


def test_empty_labeled_set_is_an_error(tmp_path):
    (tmp_path / "l" / "a").mkdir(parents=True)
    (tmp_path / "l" / "b").mkdir(parents=True)
    test = _class_folders(tmp_path / "t", ["a", "b"])
    with pytest.raises(DataError, match="data.labeled: no image files under"):
        load_labeled_sets(str(tmp_path / "l"), str(test), 8)


def test_corrupt_labeled_images_are_rejected_by_path_and_the_rest_kept(tmp_path, digits):
    labeled = copy_tree(digits.labeled, tmp_path / "l")
    bad = write_corrupt_files(labeled / "3")
    sets = load_labeled_sets(str(labeled), digits.test, 16)
    assert len(sets.labeled) == 50  # 5 per class, none lost
    assert sorted(sets.rejected["path"]) == sorted(bad)
    assert set(sets.rejected["reason"]) >= {"empty file"}
    assert len(sets.test) == 450 and sets.classes == [str(c) for c in range(10)]


def test_images_in_symlinked_folders_are_labeled_and_a_link_back_up_is_named(tmp_path):
    """A labeled set assembled from links, as a pool may be: a class folder's symlink to a
    folder elsewhere is followed (its images are that class's), a symlink back to the labeled
    root is a loop, named among the rejected, and no other class's image is taken in."""
    labeled = _class_folders(tmp_path / "l", ["a", "b"])
    elsewhere = _class_folders(tmp_path / "elsewhere", ["more"], per_class=3) / "more"
    (labeled / "a" / "linked").symlink_to(elsewhere, target_is_directory=True)
    (labeled / "b" / "up").symlink_to(labeled, target_is_directory=True)
    test = _class_folders(tmp_path / "t", ["a", "b"])
    sets = load_labeled_sets(str(labeled), str(test), 8)
    by_class = sets.labeled.groupby("label")["path"].apply(sorted).to_dict()
    assert by_class[0] == sorted([str(labeled / "a" / n) for n in ("0.png", "1.png")]
                                 + [str(labeled / "a" / "linked" / f"{i}.png") for i in range(3)])
    assert by_class[1] == [str(labeled / "b" / n) for n in ("0.png", "1.png")]  # nothing through the loop
    assert sets.rejected.to_dict("records") == [{
        "path": str(labeled / "b" / "up"),
        "reason": f"symlink loop: {labeled / 'b' / 'up'} leads back to {labeled}, which is listed already"}]

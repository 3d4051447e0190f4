import io

import numpy as np
import pytest
from PIL import Image

from selftrain.data.decode import ImageDecodeError, decode_batch, decode_image

from conftest import png_bytes


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_modes_become_rgb_of_the_requested_size():
    grey = Image.fromarray(np.full((10, 12), 200, np.uint8), mode="L")
    rgba = Image.new("RGBA", (5, 5), (10, 20, 30, 0))
    palette = Image.new("P", (6, 6), 3)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    for image, fmt in [(grey, "PNG"), (rgba, "PNG"), (palette, "PNG"), (cmyk, "JPEG"), (grey, "BMP")]:
        out = decode_image(_encode(image, fmt), size=8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (decode_image(_encode(grey), 8) == 200).all()
    assert decode_image(_encode(rgba), 8)[0, 0].tolist() == [10, 20, 30]


def test_sixteen_bit_images_are_rescaled_not_clipped():
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(values)), size=2)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and 120 < out[1, 0, 0] < 135


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"not an image at all", "not an image"),
])
def test_unreadable_bytes_say_why(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, 8)


def test_truncated_png_is_unreadable():
    good = png_bytes(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="unreadable image"):
        decode_image(good[: len(good) // 2], 8)


def test_a_bad_row_keeps_its_place_and_loses_no_good_rows():
    good = png_bytes(np.full((4, 4), 255, np.uint8))
    batch = {"path": np.array(["a", "b", "c"]), "bytes": np.array([good, b"", good], dtype=object)}
    out = decode_batch(batch, size=4)
    assert out["error"].tolist() == ["", "empty file", ""]
    assert out["path"].tolist() == ["a", "b", "c"]
    assert (out["image"][0] == 255).all() and (out["image"][1] == 0).all() and (out["image"][2] == 255).all()
    assert "bytes" not in out

"""alzstage.data.images: the one decode path, and what pixels a file or an array becomes.

Issue 24 part 1: a 16-bit PNG was clipped to white, an EXIF rotation ignored, and 0-1
float arrays cast to black; ordinary 8-bit files must not change by a single pixel
(the decode stage reads them through the same function, and the demo metrics stay).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image

from alzstage.data.images import (
    ImageReadError,
    decode_slice,
    float_to_8bit,
    high_depth_to_8bit,
    load_batch,
    load_gray,
    pixels_8bit,
    to_model_array,
)

ORIENTATION = 0x0112


def encoded(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sideways_with_exif(gray: np.ndarray, fmt: str) -> bytes:
    """The slice stored turned 90 degrees counter-clockwise, its EXIF saying "rotate 90 CW"."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(gray, 1)))
    extra = {"quality": 95} if fmt == "JPEG" else {}
    return encoded(stored, fmt, exif=exif.tobytes(), **extra)


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Demo-generator JPEGs, as the decode stage reads them."""
    from alzstage.data.demo import generate_demo

    records = generate_demo(
        tmp_path_factory.mktemp("demo"),
        classes=CLASSES,
        subjects_per_class=[1] * len(CLASSES),
        slices_per_subject=2,
        image_size=(208, 176),
        seed=7,
    )
    return [r.path for r in records]


def _convert_l(path: Path) -> np.ndarray:
    """What every decode was before issue 24: Pillow's convert("L")."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def test_ordinary_8bit_files_decode_to_the_very_pixels_they_always_did(
    slices: list[Path], tmp_path: Path
) -> None:
    # given the demo JPEGs, and 8-bit grayscale, palette and RGB PNGs of one of them
    gray = _convert_l(slices[0])
    extra = []
    for mode in ("L", "P", "RGB", "RGBA", "LA"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(gray).convert(mode).save(path)
        extra.append(path)
    rgb_jpeg = tmp_path / "rgb.jpg"
    Image.fromarray(gray).convert("RGB").save(rgb_jpeg, quality=90)
    # when each is decoded by the decode path (the decode stage's call and load_gray's)
    for path in [*slices, *extra, rgb_jpeg]:
        got = decode_slice(path, max_pixels=2**31, formats=None).gray
        # then not a single pixel differs from convert("L"), at any size asked for
        np.testing.assert_array_equal(got, _convert_l(path))
        want = np.asarray(Image.fromarray(_convert_l(path)).resize((48, 56), Image.BILINEAR))
        np.testing.assert_array_equal(load_gray(path, (56, 48)), want)
    assert load_batch(slices, (56, 48)).shape == (len(slices), 56, 48)


def test_the_decode_stage_stores_the_pixels_convert_l_made(slices: list[Path]) -> None:
    from alzstage.data.pixels import decode_files

    # given the demo JPEGs under one folder
    raw = slices[0].parents[1]
    rel = [p.relative_to(raw).as_posix() for p in slices]
    # when the decode stage decodes them
    out = decode_files(raw, rel, (56, 48), (32,), workers=2)
    # then its network inputs are convert("L") resized, pixel for pixel
    for i, path in enumerate(slices):
        want = np.asarray(Image.fromarray(_convert_l(path)).resize((48, 56), Image.BILINEAR))
        np.testing.assert_array_equal(out["images"][i], want)


def test_a_16bit_png_decodes_to_its_8bit_original(slices: list[Path]) -> None:
    # given an 8-bit slice and 16-bit copies of it, as exporters write them
    gray = _convert_l(slices[1])
    full = gray.astype(np.uint16) * 257  # 0..65535
    shifted = gray.astype(np.uint16) << 8  # 0..65280
    twelve = gray.astype(np.uint16) * 16  # a 12-bit export, 0..4080
    # when each is decoded
    decoded = {
        name: decode_slice(encoded(Image.fromarray(v))).gray
        for name, v in {"x257": full, "x256": shifted, "12bit": twelve}.items()
    }
    # then the first is the original exactly, the others within one grey level
    np.testing.assert_array_equal(decoded["x257"], gray)
    for name in ("x256", "12bit"):
        assert np.abs(decoded[name].astype(int) - gray).max() <= 1, name
    # and nothing is clipped (convert("L") turned every value over 255 white)
    assert (decoded["x257"] == 255).mean() == (gray == 255).mean()


def test_high_depth_values_are_scaled_by_the_bits_they_use() -> None:
    # given integer pixels of several depths
    cases = {
        "8-bit in a 16-bit container": (np.array([0, 128, 255]), [0, 128, 255]),
        "10-bit": (np.array([0, 512, 1023]), [0, 128, 255]),
        "16-bit": (np.array([0, 65535]), [0, 255]),
        "signed: min..max": (np.array([-50, 0, 200]), [0, 51, 255]),
    }
    for name, (values, want) in cases.items():
        # when scaled, then as the rule says
        assert high_depth_to_8bit(values).tolist() == want, name


def test_a_float_image_file_is_read_by_its_range() -> None:
    assert float_to_8bit(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    assert float_to_8bit(np.array([0.0, 100.0, 255.0])).tolist() == [0, 100, 255]
    assert float_to_8bit(np.array([-1.0, 0.0, 3.0])).tolist() == [0, 64, 255]
    # and a float TIFF (a local file: any format Pillow reads) goes through it
    tiff = encoded(Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)), "TIFF")
    assert decode_slice(tiff, formats=None).gray.tolist() == [[0, 128], [255, 64]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_and_the_upright_size_reported(
    slices: list[Path], fmt: str
) -> None:
    # given a slice stored sideways with an EXIF "rotate 90" tag, and stored upright
    gray = _convert_l(slices[2])
    extra = {"quality": 95} if fmt == "JPEG" else {}
    upright = decode_slice(encoded(Image.fromarray(gray), fmt, **extra))
    # when the sideways file is decoded
    turned = decode_slice(sideways_with_exif(gray, fmt))
    # then it is the upright slice, 176 wide and 208 high
    assert (turned.width, turned.height) == (176, 208) and turned.gray.shape == (208, 176)
    diff = np.abs(turned.gray.astype(int) - upright.gray.astype(int)).mean()
    assert diff == 0 if fmt == "PNG" else diff < 1.0


def test_a_large_exif_rotated_jpeg_is_shrunk_and_put_upright() -> None:
    # given a 2000x1200 (WxH) JPEG stored sideways with an EXIF rotation
    gray = np.zeros((1200, 2000), np.uint8)
    gray[100:300, 100:900] = 255  # a bright bar top-left, to see where it lands
    data = sideways_with_exif(gray, "JPEG")
    # when decoded with the display cap
    d = decode_slice(data, max_side=512)
    # then the upright size is reported and the shrunk pixels are upright too
    assert (d.width, d.height) == (2000, 1200)
    assert d.gray.shape[1] > d.gray.shape[0]
    h, w = d.gray.shape
    assert d.gray[: h // 4, : w // 2].mean() > d.gray[h // 2 :, w // 2 :].mean() + 50


def test_arrays_follow_the_stated_rule() -> None:
    ramp = np.linspace(0, 1, 12).reshape(3, 4)
    # 0-1 floats are detected and scaled, 0-255 numbers kept, uint8 untouched
    assert pixels_8bit(ramp).max() == 255 and pixels_8bit(ramp)[1, 1] == round(5 / 11 * 255)
    np.testing.assert_array_equal(pixels_8bit(ramp * 255), np.rint(ramp * 255))
    np.testing.assert_array_equal(pixels_8bit(np.arange(256).astype(np.int64)), np.arange(256))
    # a declared range wins over detection: an all-0/1 mask can be meant as 0-1
    mask = np.array([[0.0, 1.0]])
    assert pixels_8bit(mask).tolist() == [[0, 1]]
    assert pixels_8bit(mask, "0-1").tolist() == [[0, 255]]
    # to_model_array reads non-uint8 arrays by the same rule (it used to min-max stretch)
    assert to_model_array(np.array([[0.0, 0.2], [0.4, 0.6]]), (2, 2)).tolist() == [
        [0, 51],
        [102, 153],
    ]


@pytest.mark.parametrize(
    ("values", "pixel_range", "words"),
    [
        (np.array([[0.0, 300.0]]), "auto", "from 0 to 300, outside 0-255"),
        (np.array([[0, 4095]], np.uint16), "auto", "outside 0-255"),
        (np.array([[0.0, 2.0]]), "0-1", "outside 0-1"),
        (np.array([[-0.5, 0.5]]), "auto", "outside 0-255"),
        (np.array([[np.nan, 1.0]]), "auto", "NaN or infinity"),
        (np.array([["a", "b"]]), "auto", "must be numbers"),
        (np.array([[True, False]]), "auto", "must be numbers"),
        (np.array([[1, 2]]), "0-100", "not one of auto, 0-255, 0-1"),
    ],
)
def test_arrays_that_do_not_fit_the_rule_are_refused_saying_why(
    values: np.ndarray, pixel_range: str, words: str
) -> None:
    with pytest.raises(ImageReadError, match=words) as info:
        pixels_8bit(values, pixel_range, name="slice 0")
    assert str(info.value).startswith("slice 0: ") and len(str(info.value)) < 300

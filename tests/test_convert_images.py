"""Images as they come in the wild -> correct RGB, or a BadImage that says why."""

import io

import numpy as np
import pytest
from PIL import Image

from convert.images import BadImage, array_to_rgb, load_rgb
from convert.synthetic import photo_variants


@pytest.fixture(scope="module")
def photo():
    return next(photo_variants(1, seed=3, size=(64, 48), noise=0.0))  # about (48, 64, 3)


def _save(img: Image.Image, path, fmt="PNG", **kw):
    img.save(path, fmt, **kw)
    return path


def test_rgb_and_grey(tmp_path, photo):
    assert np.array_equal(load_rgb(_save(Image.fromarray(photo), tmp_path / "a.png")), photo)
    grey = photo[..., 0]
    out = load_rgb(_save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
    assert out.shape == photo.shape and all(np.array_equal(out[..., c], grey) for c in range(3))


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    rgba[2:, :2, 3] = 0
    rgba[2:, 2:, 3] = 128
    out = load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2:, :2] == 255).all()
    # half transparent: halfway between red and white
    assert np.allclose(out[2:, 2:].astype(int), [227, 127, 127], atol=2)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    out = load_rgb(_save(la, tmp_path / "la.png"))
    assert (out[2:, :2] == 255).all() and (out[:2] == 200).all()


def test_palette_with_and_without_transparency(tmp_path, photo):
    pal = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    expected = np.asarray(pal.convert("RGB"))
    assert np.array_equal(load_rgb(_save(pal, tmp_path / "p.png")), expected)
    pal.info["transparency"] = 0
    out = load_rgb(_save(pal, tmp_path / "pt.png", transparency=0))
    hidden = np.asarray(pal) == 0
    assert hidden.any() and (out[hidden] == 255).all()
    assert np.array_equal(out[~hidden], expected[~hidden])


def test_cmyk_jpeg(tmp_path, photo):
    cmyk = Image.fromarray(photo).convert("CMYK")
    out = load_rgb(_save(cmyk, tmp_path / "c.jpg", "JPEG", quality=95))
    assert np.abs(out.astype(int) - photo.astype(int)).mean() < 4


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040  # 0 .. 65520
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    out = load_rgb(_save(img, tmp_path / "i16.png"))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and out[..., 0].max() > 250


def test_one_bit(tmp_path):
    bits = np.zeros((8, 8), bool)
    bits[::2] = True
    out = load_rgb(_save(Image.fromarray(bits), tmp_path / "b.png"))
    assert (out[::2] == 255).all() and (out[1::2] == 0).all()


def test_exif_orientation_is_applied(tmp_path, photo):
    img = Image.fromarray(photo)  # wider than high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", quality=95, subsampling=0, exif=exif)
    out = load_rgb(path).astype(int)
    assert out.shape == (photo.shape[1], photo.shape[0], 3)
    right = np.asarray(img.transpose(Image.Transpose.ROTATE_270)).astype(int)
    wrong = np.asarray(img.transpose(Image.Transpose.ROTATE_90)).astype(int)
    assert np.abs(out - right).mean() < 4 < 20 < np.abs(out - wrong).mean()


def test_png_named_jpeg_is_read_for_what_it_is(tmp_path, photo):
    path = _save(Image.fromarray(photo), tmp_path / "really_a_png.JPEG", "PNG")
    assert np.array_equal(load_rgb(path), photo)


def test_large_images_are_shrunk_to_max_side(tmp_path):
    big = next(photo_variants(1, seed=5, size=(500, 376), noise=0.0))
    path = _save(Image.fromarray(big), tmp_path / "big.png")
    out = load_rgb(path, max_side=128)
    h, w = big.shape[:2]
    assert max(out.shape[:2]) == 128
    assert out.shape[:2] == (round(h * 128 / w), 128)
    reference = np.asarray(Image.fromarray(big).resize(out.shape[1::-1], Image.Resampling.LANCZOS))
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3  # a proper downscale
    small = load_rgb(path, max_side=1000)
    assert np.array_equal(small, big)  # never upscaled
    jpeg = _save(Image.fromarray(big), tmp_path / "big.jpg", "JPEG", quality=95)
    assert max(load_rgb(jpeg, max_side=100).shape[:2]) == 100  # through the reduced-scale decode


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n" * 4, "not an image PIL can read"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not an image PIL can read"),
    ],
)
def test_bad_files_say_why(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        load_rgb(path)


def test_truncated_jpeg(tmp_path, photo):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(path)
    with pytest.raises(BadImage, match="file not found"):
        load_rgb(tmp_path / "absent.jpg")


def test_arrays():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(array_to_rgb(grey), np.repeat(grey[..., None], 3, 2))
    with pytest.raises(BadImage, match="uint8"):
        array_to_rgb(grey.astype(np.float32))
    with pytest.raises(BadImage, match="shape"):
        array_to_rgb(np.zeros((4, 4, 2), np.uint8))

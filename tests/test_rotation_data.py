"""Rotation data: sources (folders with EXIF, IDX arrays), fixed vs fresh angles, windows, degradations."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from effvit.data import list_images
from effvit.data import load_image as load_upright
from effvit.rotation.data import (
    ArrayImages,
    FolderImages,
    RotatedImages,
    centre_square,
    fashion_mnist,
    to_input,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def photos(n=4, size=(96, 64)):
    rng = np.random.default_rng(0)
    return ArrayImages(rng.integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8))


def exif_jpeg(path, size=(40, 20), orientation=6):
    img = Image.new("RGB", size, (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, size[0] // 2, size[1]))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_load_upright_applies_exif_orientation_and_shrinks(tmp_path):
    exif_jpeg(tmp_path / "a.jpg")
    img = load_upright(tmp_path / "a.jpg")
    assert img.size == (20, 40) and img.mode == "RGB"  # orientation 6: displayed rotated by 90 degrees
    top = np.asarray(img)[2, 10]
    assert top[2] > 150  # orientation 6 turns the left (blue) half to the top
    big = tmp_path / "big.png"
    Image.new("RGB", (800, 300)).save(big)
    assert load_upright(big, short_side=100).size == (267, 100)
    assert load_upright(big, short_side=1000).size == (800, 300)  # never enlarged


def test_folder_images_lists_recursively_and_caches(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "b.png")
    exif_jpeg(tmp_path / "sub" / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    src = FolderImages.from_roots(tmp_path, short_side=None)
    assert len(src) == 2 and src.names[0].endswith("b.png")
    assert src[1] is src[1]  # cached
    assert list_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderImages.from_roots(tmp_path / "empty")


def test_fashion_mnist_source(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    head = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", 2, 28, 28)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    labels = struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 2) + bytes([3, 7])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    src = fashion_mnist("test", root=tmp_path)
    assert len(src) == 2 and src[1].size == (40, 40) and src.names[1] == "fashion-mnist-test-1"
    assert np.array_equal(np.asarray(src[1])[6:34, 6:34], arr[1])
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("val", root=tmp_path)


def test_unreadable_file_becomes_a_marker(tmp_path):
    from effvit.data import Unreadable

    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"broken")
    ds = RotatedImages(FolderImages.from_roots(tmp_path), 16, MEAN, STD, seed=0)
    assert isinstance(ds[0], tuple)
    bad = ds[1]
    assert isinstance(bad, Unreadable) and bad.name.endswith("b.jpg") and "cannot identify" in bad.error


def test_array_images_pad_to_square():
    src = ArrayImages(np.full((1, 28, 28), 255, np.uint8), pad_to=40)
    img = np.asarray(src[0])
    assert img.shape == (40, 40) and img[6:34, 6:34].min() == 255 and img.sum() == 255 * 28 * 28
    with pytest.raises(ValueError, match="uint8"):
        ArrayImages(np.zeros((2, 8, 8), np.float32))


def test_fixed_seed_is_reproducible_fresh_draws_differ():
    fixed = RotatedImages(photos(), 32, MEAN, STD, seed=7)
    x1, a1 = fixed[2]
    x2, a2 = fixed[2]
    assert torch.equal(x1, x2) and a1 == a2 and a1.item() == pytest.approx(fixed.angle(2))
    assert x1.shape == (3, 32, 32) and x1.dtype == torch.float32
    assert len({round(fixed.angle(i), 3) for i in range(4)}) == 4
    assert RotatedImages(photos(), 32, MEAN, STD, seed=8).angle(2) != a1.item()
    fresh = RotatedImages(photos(), 32, MEAN, STD)
    torch.manual_seed(0)
    draws = {round(fresh[0][1].item(), 3) for _ in range(5)}
    assert len(draws) == 5  # a new angle every read, hence every epoch
    with pytest.raises(ValueError, match="seed"):
        fresh.angle(0)


def test_angles_uniform_on_full_circle_and_in_tilt_window():
    ds = RotatedImages(photos(1), 16, MEAN, STD, seed=0, repeats=2000)
    a = np.array([ds.angle(i) for i in range(len(ds))])
    assert a.min() >= 0 and a.max() < 360
    assert np.histogram(a, bins=4, range=(0, 360))[0].min() > 400  # roughly uniform quarters
    tilt = RotatedImages(photos(1), 16, MEAN, STD, angle_range=(-45, 45), seed=0, repeats=500)
    t = np.array([tilt.angle(i) for i in range(len(tilt))])
    assert ((t <= 45) | (t >= 315)).all()
    assert (t > 300).any() and (t < 60).any()  # both signs, stored mod 360


def test_rendered_sample_is_the_rotated_crop():
    # a padded square on a black background, 'same' crop: the sample equals rotating by its label
    src = ArrayImages(np.pad(np.full((1, 20, 20), 255, np.uint8), ((0, 0), (10, 10), (10, 10))))
    ds = RotatedImages(src, 40, (0.0,), (1.0,), crop="same", seed=3)
    img, theta = ds.render(0)
    expected = src[0].rotate(theta, resample=Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    x, label = ds[0]
    assert label.item() == pytest.approx(theta)
    assert torch.allclose(x, to_input(img, 40, (0.0,), (1.0,)))


def test_max_area_samples_have_no_border_and_degradations_run():
    white = ArrayImages(np.full((2, 60, 90, 3), 255, np.uint8))
    ds = RotatedImages(white, 24, (0, 0, 0), (1 / 255,) * 3, seed=1, repeats=10, crop_scale=(0.3, 1.0),
                       hflip=True, jpeg=(1.0, 30, 60), blur=(1.0, 1.5))
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.min() > 240, i  # values in 0..255 units: no black corner survives the crop
    with pytest.raises(ValueError, match="angle_range"):
        RotatedImages(white, 24, MEAN, STD, angle_range=(10, -10))
    with pytest.raises(ValueError, match="unknown crop"):
        RotatedImages(white, 24, MEAN, STD, crop="square")


def test_centre_square_and_to_input():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    assert centre_square(img, 50).size == (50, 50)
    x = to_input(img, 50, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (3, 50, 50) and x[0].mean().item() == pytest.approx(1.0) and x[1].mean() == -1.0
    with pytest.raises(ValueError, match="3-channel"):
        to_input(img, 50, (0.5,), (0.5,))


def test_colour_and_noise_are_seeded_and_noise_is_set_at_the_output_size():
    grey = np.full((1, 80, 80, 3), 128, np.uint8)
    kw = dict(size=20, mean=(0, 0, 0), std=(1 / 255,) * 3, angle_range=(-5, 5), seed=4, repeats=6)
    plain = RotatedImages(ArrayImages(grey), **kw)
    jitter = RotatedImages(ArrayImages(grey), colour=(1.0, 0.4), **kw)
    a, b = jitter[0][0], jitter[0][0]
    assert torch.equal(a, b)  # a seeded sample is fixed, colour included
    shifts = [float(jitter[i][0].mean() - plain[i][0].mean()) for i in range(6)]
    assert max(abs(s) for s in shifts) > 5 and len({round(s, 3) for s in shifts}) > 1  # per-sample factors
    # the same sigma draw at two input resolutions gives about the same noise at the output size
    stds = []
    for side in (20, 40):
        flat = ArrayImages(np.full((1, side, side, 3), 128, np.uint8))
        noisy = RotatedImages(flat, noise=(1.0, 12.0), **dict(kw, angle_range=(0, 1e-6)))
        stds.append(float(noisy[0][0].std()))
    assert 0.5 < stds[0] <= 12.0 * 1.1 and 0.8 < stds[1] / stds[0] < 1.25
    with pytest.raises(ValueError, match="probability"):
        RotatedImages(ArrayImages(grey), noise=(2.0, 5.0), **kw)
    with pytest.raises(ValueError, match="colour strength"):
        RotatedImages(ArrayImages(grey), colour=(0.5, 1.5), **kw)

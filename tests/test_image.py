"""Tests for fine_jax.data.image (method spec §6.4)."""
import functools
import pickle

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from fine_jax.data import image as I

MEAN = np.asarray(I.CLIP_MEAN, dtype=np.float32)
STD = np.asarray(I.CLIP_STD, dtype=np.float32)


def _textured(h, w, seed=0):
    """Smooth gradients plus noise: enough structure that every op changes something."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 7 + yy * 3) % 256], -1)
    return np.clip(base + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)


def _ref_normalize(img):
    return (img.astype(np.float32) / np.float32(255) - MEAN) / STD


# ------------------------------------------------------------------------------------------------
# normalize / resize / transforms
# ------------------------------------------------------------------------------------------------
def test_normalize_values():
    img = np.array([[[0, 0, 0], [255, 255, 255], [128, 64, 200]]], dtype=np.uint8)
    out = I.normalize(img)
    assert out.dtype == np.float32 and out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out, _ref_normalize(img))
    np.testing.assert_allclose(out[0, 0], -MEAN / STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (1 - MEAN) / STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 2, 1], (64 / 255 - I.CLIP_MEAN[1]) / I.CLIP_STD[1], rtol=1e-6)
    full = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(I.normalize(full), _ref_normalize(full))


def test_shapes_and_dtypes():
    img = _textured(50, 70)
    rng = np.random.default_rng(0)
    assert I.resize(img, 32).shape == (32, 32, 3) and I.resize(img, 32).dtype == np.uint8
    assert I.resize(img, (20, 40)).shape == (20, 40, 3)
    crop = I.random_resized_crop(img, rng, 40)
    assert crop.shape == (40, 40, 3) and crop.dtype == np.uint8
    aug = I.rand_augment(img, rng)
    assert aug.shape == img.shape and aug.dtype == np.uint8
    for out in (I.train_transform(img, rng, 48), I.train_transform(img, rng, 48, randaug_n=0),
                I.test_transform(img, 48)):
        assert out.shape == (48, 48, 3) and out.dtype == np.float32
        assert np.isfinite(out).all()


def test_test_transform_is_pil_bicubic_resize_then_normalize():
    img = _textured(45, 61)
    expected = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(I.resize(img, 32), expected)
    np.testing.assert_array_equal(I.test_transform(img, 32), _ref_normalize(expected))


def test_train_transform_deterministic_per_seed():
    img = _textured(64, 64)
    a = I.train_transform(img, np.random.default_rng(123), 32)
    b = I.train_transform(img, np.random.default_rng(123), 32)
    np.testing.assert_array_equal(a, b)
    others = [I.train_transform(img, np.random.default_rng(s), 32) for s in (1, 2, 3)]
    assert all(not np.array_equal(a, o) for o in others)


def test_train_transform_without_randaug_or_flip_is_crop_then_normalize():
    img = _textured(40, 56)
    out = I.train_transform(img, np.random.default_rng(5), 24, hflip=False, randaug_n=0)
    crop = I.random_resized_crop(img, np.random.default_rng(5), 24)
    np.testing.assert_array_equal(out, I.normalize(crop))


def test_transforms_are_picklable():
    fn = pickle.loads(pickle.dumps(functools.partial(I.train_transform, size=16)))
    img = _textured(20, 20)
    np.testing.assert_array_equal(fn(img, np.random.default_rng(0)),
                                  I.train_transform(img, np.random.default_rng(0), 16))


# ------------------------------------------------------------------------------------------------
# RandomResizedCrop
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(200, 300), (300, 200), (64, 64)])
def test_random_resized_crop_params_respect_bounds(hw):
    height, width = hw
    area = height * width
    fallback = I.random_resized_crop_params(height, width, np.random.default_rng(0), scale=(2.0, 2.0))
    for seed in range(200):
        i, j, h, w = I.random_resized_crop_params(height, width, np.random.default_rng(seed))
        assert 0 <= i <= height - h and 0 <= j <= width - w and 0 < h <= height and 0 < w <= width
        if (i, j, h, w) == fallback:
            continue
        # w, h are rounded from sqrt(A * r), sqrt(A / r) with A/area in [0.5, 1], r in [3/4, 4/3].
        assert (w + 0.5) * (h + 0.5) >= 0.5 * area
        assert (w - 0.5) * (h - 0.5) <= 1.0 * area
        assert (w - 0.5) / (h + 0.5) <= 4 / 3 and (w + 0.5) / (h - 0.5) >= 3 / 4


def test_random_resized_crop_fallback_is_central_ratio_clamped():
    # An unreachable scale makes all 10 attempts fail.
    wide = I.random_resized_crop_params(200, 300, np.random.default_rng(0), scale=(2.0, 2.0))
    assert wide == (0, 16, 200, 267)  # w = round(200 * 4/3)
    tall = I.random_resized_crop_params(300, 200, np.random.default_rng(0), scale=(2.0, 2.0))
    assert tall == (16, 0, 267, 200)
    square = I.random_resized_crop_params(50, 50, np.random.default_rng(0), scale=(2.0, 2.0))
    assert square == (0, 0, 50, 50)


def test_random_resized_crop_is_crop_then_pil_bicubic():
    img = _textured(60, 80)
    i, j, h, w = I.random_resized_crop_params(60, 80, np.random.default_rng(9))
    expected = np.asarray(
        Image.fromarray(img).crop((j, i, j + w, i + h)).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(I.random_resized_crop(img, np.random.default_rng(9), 32), expected)


# ------------------------------------------------------------------------------------------------
# RandAugment ops
# ------------------------------------------------------------------------------------------------
def test_identity_op():
    img = _textured(10, 12)
    np.testing.assert_array_equal(I.apply_op(img, "Identity", 7, np.random.default_rng(0)), img)


@pytest.mark.parametrize("offset", [7, -7])
def test_translate_integer_shift_with_fill(offset):
    img = _textured(16, 20)
    tx = I.translate_x(img, float(offset))
    ty = I.translate_y(img, float(offset))
    if offset > 0:  # content moves left / up by `offset`, fill enters on the right / bottom
        np.testing.assert_array_equal(tx[:, :-offset], img[:, offset:])
        assert (tx[:, -offset:] == 128).all()
        np.testing.assert_array_equal(ty[:-offset], img[offset:])
        assert (ty[-offset:] == 128).all()
    else:
        k = -offset
        np.testing.assert_array_equal(tx[:, k:], img[:, :-k])
        assert (tx[:, :k] == 128).all()
        np.testing.assert_array_equal(ty[k:], img[:-k])
        assert (ty[:k] == 128).all()


def test_translate_op_at_level_7_is_a_7_pixel_shift():
    img = _textured(16, 20)
    for seed in range(6):
        out = I.apply_op(img, "TranslateX", 7, np.random.default_rng(seed))
        assert any(np.array_equal(out, I.translate_x(img, s)) for s in (7.0, -7.0))
        assert (out == 128).all(axis=2).any(axis=0).sum() == 7  # exactly 7 fill columns


def test_half_pixel_translate_interpolates_and_blends_fill():
    img = _textured(8, 10)
    out = I.translate_x(img, 0.5)
    p = img.astype(np.int32)
    # The mean of the two neighbours rounded half up, the fill taking part at the edge: OpenCV 4's
    # fixed-point bilinear weights (the reference's; OpenCV 5 rounds differently, hence the pin).
    np.testing.assert_array_equal(out[:, :-1], (p[:, :-1] + p[:, 1:] + 1) // 2)
    np.testing.assert_array_equal(out[:, -1], (p[:, -1] + 128 + 1) // 2)


def test_rotate_keeps_size_and_fills_corners():
    img = np.full((40, 30, 3), 200, dtype=np.uint8)
    for deg in (21.0, -21.0):
        out = I.rotate(img, deg)
        assert out.shape == img.shape and out.dtype == np.uint8
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert (out[y, x] == 128).all()
        assert (out[20, 15] == 200).all()


def test_rotate_90_is_counterclockwise_about_w_over_2():
    img = _textured(12, 12)
    out = I.rotate(img, 90.0)
    # Centre (W/2, H/2) is half a pixel off the pixel-grid centre, so the result is np.rot90 shifted
    # down by one row, with the fill entering on top.
    np.testing.assert_array_equal(out[1:], np.rot90(img)[:-1])
    assert (out[0] == 128).all()


def test_shear_x_rows_shift_by_factor_times_y():
    img = _textured(9, 14)
    out = I.shear_x(img, 0.25)
    for y in (0, 4, 8):  # rows where 0.25 * y is a whole number of pixels
        s = y // 4
        np.testing.assert_array_equal(out[y, s:], img[y, :img.shape[1] - s])
        assert (out[y, :s] == 128).all()


def test_shear_y_is_transposed_shear_x():
    img = _textured(11, 13)
    for f in (0.21, -0.21):
        np.testing.assert_array_equal(
            I.shear_y(img, f), I.shear_x(img.transpose(1, 0, 2).copy(), f).transpose(1, 0, 2))


def test_brightness_factor():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = I.brightness(img, 1.36)
    ref = np.clip(np.floor(img.astype(np.float32) * np.float32(1.36)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)
    assert out[0, 0, 0] == 0 and out.reshape(-1, 3)[100, 0] == 136 and out[-1, -1, 0] == 255
    np.testing.assert_array_equal(I.apply_op(img, "Brightness", 7, np.random.default_rng(0)), out)


def _equalize_ref(img):
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        hist = [int((ch == v).sum()) for v in range(256)]
        last_nonzero = [h for h in hist if h][-1]
        step = (sum(hist) - last_nonzero) // 255
        if step == 0:
            out[..., c] = ch
            continue
        lut, acc = [], step // 2
        for v in range(256):
            lut.append(min(acc // step, 255))
            acc += hist[v]
        out[..., c] = np.asarray(lut, dtype=np.uint8)[ch]
    return out


def test_equalize_matches_reference_and_pil():
    img = _textured(20, 24)
    img[..., 2] = 9  # a constant channel (step == 0) stays as is
    out = I.equalize(img)
    np.testing.assert_array_equal(out, _equalize_ref(img))
    np.testing.assert_array_equal(out, np.asarray(ImageOps.equalize(Image.fromarray(img))))
    np.testing.assert_array_equal(out[..., 2], img[..., 2])


def _autocontrast_ref(img, quirk):
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        lo, hi = int(ch.min()), int(ch.max())
        if hi <= lo:
            out[..., c] = ch
            continue
        scale = 255.0 / (hi - lo)
        offset = (256 - lo) % 256 * scale if quirk else -lo * scale
        lut = [min(max(int(v * scale + offset), 0), 255) for v in range(256)]
        out[..., c] = np.asarray(lut, dtype=np.uint8)[ch]
    return out


def test_autocontrast_fixed_matches_reference_and_pil():
    img = (_textured(20, 24).astype(np.int32) // 2 + 40).astype(np.uint8)  # min > 0 on every channel
    img[0, 0, 1] = 0
    out = I.autocontrast(img, albef_quirks=False)
    np.testing.assert_array_equal(out, _autocontrast_ref(img, quirk=False))
    np.testing.assert_array_equal(out, np.asarray(ImageOps.autocontrast(Image.fromarray(img))))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255


def test_autocontrast_reference_quirk():
    img = (_textured(20, 24).astype(np.int32) // 2 + 40).astype(np.uint8)
    img[0, 0, 1] = 0  # channel 1 has min 0: stretched normally
    img[..., 2] = 77  # constant channel: unchanged
    out = I.autocontrast(img)
    np.testing.assert_array_equal(out, _autocontrast_ref(img, quirk=True))
    assert (out[..., 0] == 255).all()  # min > 0: the uint8 negation wrap saturates the channel
    np.testing.assert_array_equal(out[..., 1], I.autocontrast(img, albef_quirks=False)[..., 1])
    np.testing.assert_array_equal(out[..., 2], img[..., 2])
    np.testing.assert_array_equal(I.apply_op(img, "AutoContrast", 7, np.random.default_rng(0)), out)


def _sharpness_ref(img, factor, quirk):
    p = img.astype(np.float64)
    k = np.ones((3, 3)) / 13
    k[1, 1] = 5 / 13
    h, w = img.shape[:2]
    deg = np.zeros_like(p)
    for dy in range(3):
        for dx in range(3):
            deg[1:-1, 1:-1] += k[dy, dx] * p[dy:dy + h - 2, dx:dx + w - 2]
    deg = np.rint(deg).astype(np.float32)
    out = img.copy()
    blend = deg[1:-1, 1:-1] + np.float32(factor) * (img[1:-1, 1:-1].astype(np.float32) - deg[1:-1, 1:-1])
    if quirk:
        out[1:-1, 1:-1] = (np.trunc(blend).astype(np.int64) % 256).astype(np.uint8)
    else:
        out[1:-1, 1:-1] = np.clip(blend, 0, 255).astype(np.uint8)
    return out


def test_sharpness_blend_and_reference_overflow():
    img = _textured(15, 17)
    np.testing.assert_array_equal(I.sharpness(img, 1.0), img)
    for quirk in (True, False):
        for f in (1.36, 0.55):
            np.testing.assert_array_equal(I.sharpness(img, f, albef_quirks=quirk),
                                          _sharpness_ref(img, f, quirk))
    spot = np.zeros((11, 11, 3), dtype=np.uint8)
    spot[5, 5] = 255
    q, fixed = I.sharpness(spot, 1.36), I.sharpness(spot, 1.36, albef_quirks=False)
    # centre: degenerate round(5*255/13) = 98, blend 98 + 1.36 * 157 = 311.5 -> 311 -> wraps to 55
    assert q[5, 5, 0] == 55 and fixed[5, 5, 0] == 255
    # neighbour: degenerate 20, blend 20 - 1.36 * 20 = -7.2 -> -7 -> wraps to 249
    assert q[4, 5, 0] == 249 and fixed[4, 5, 0] == 0
    np.testing.assert_array_equal(I.apply_op(spot, "Sharpness", 7, np.random.default_rng(0)), q)


def test_sharpness_factor_zero_is_smooth_filter_with_reflect_border():
    img = _textured(9, 10)
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="reflect").astype(np.int64)
    s = sum(p[dy:dy + 9, dx:dx + 10] for dy in range(3) for dx in range(3)) + 4 * p[1:-1, 1:-1]
    np.testing.assert_array_equal(I.sharpness(img, 0.0), np.rint(s / 13).astype(np.uint8))


def test_rand_augment_draw_order():
    img = _textured(24, 24)
    for seed in range(8):
        got = I.rand_augment(img, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        ops = rng.integers(0, len(I.RANDAUG_OPS), size=2)
        exp = img
        for k in ops:
            if rng.random() > 0.5:
                continue
            exp = I.apply_op(exp, I.RANDAUG_OPS[int(k)], 7, rng)
        np.testing.assert_array_equal(got, exp)
    np.testing.assert_array_equal(I.rand_augment(img, np.random.default_rng(0), n=0), img)


def test_signed_ops_use_both_signs():
    img = _textured(16, 16)
    seen = {I.apply_op(img, "Rotate", 7, np.random.default_rng(s)).tobytes() for s in range(12)}
    assert seen == {I.rotate(img, 21.0).tobytes(), I.rotate(img, -21.0).tobytes()}
    seen = {I.apply_op(img, "ShearX", 7, np.random.default_rng(s)).tobytes() for s in range(12)}
    assert seen == {I.shear_x(img, 0.21).tobytes(), I.shear_x(img, -0.21).tobytes()}


# ------------------------------------------------------------------------------------------------
# OpenCV: the reference's own calls
# ------------------------------------------------------------------------------------------------
def _reference_warp(img, m):
    h, w = img.shape[:2]
    return cv2.warpAffine(img, m, (w, h), borderValue=(128, 128, 128), flags=cv2.INTER_LINEAR)


def test_geometric_ops_are_the_reference_opencv_calls():
    rng = np.random.default_rng(0)
    for h, w in ((33, 47), (64, 64)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for f in (0.21, -0.21):
            np.testing.assert_array_equal(I.shear_x(img, f), _reference_warp(img, np.float32([[1, f, 0], [0, 1, 0]])))
            np.testing.assert_array_equal(I.shear_y(img, f), _reference_warp(img, np.float32([[1, 0, 0], [f, 1, 0]])))
        for t in (7.0, -7.0, 2.3):
            np.testing.assert_array_equal(I.translate_x(img, t),
                                          _reference_warp(img, np.float32([[1, 0, -t], [0, 1, 0]])))
            np.testing.assert_array_equal(I.translate_y(img, t),
                                          _reference_warp(img, np.float32([[1, 0, 0], [0, 1, -t]])))
        for deg in (21.0, -21.0, 90.0):
            m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1)
            np.testing.assert_array_equal(I.rotate(img, deg), _reference_warp(img, m))


def _reference_sharpness(img, factor):
    """ALBEF ``sharpness_func`` as written (cv2.filter2D, float32 blend, ``astype(np.uint8)``)."""
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1][1] = 5
    kernel /= 13
    degenerate = cv2.filter2D(img, -1, kernel)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    degenerate = degenerate.astype(np.float32)[1:-1, 1:-1, :]
    out[1:-1, 1:-1, :] = degenerate + factor * (out[1:-1, 1:-1, :] - degenerate)
    # the reference's bare astype(np.uint8), with the x86 truncate-and-wrap spelled out
    return out.astype(np.int32).astype(np.uint8)


def test_sharpness_is_the_reference_opencv_call():
    rng = np.random.default_rng(1)
    for h, w in ((33, 47), (64, 64), (3, 5)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for f in (0.0, 0.55, 1.0, 1.36):
            np.testing.assert_array_equal(I.sharpness(img, f), _reference_sharpness(img, f))


def test_opencv_ops_accept_views_and_other_channel_counts():
    img = _textured(20, 24)
    ro = np.asarray(Image.fromarray(img))  # read-only, as PIL-backed arrays are
    flipped = img[:, ::-1]  # negative stride
    for op in (functools.partial(I.rotate, degrees=21.0), functools.partial(I.shear_x, factor=0.21),
               functools.partial(I.sharpness, factor=1.36)):
        np.testing.assert_array_equal(op(ro), op(img))
        np.testing.assert_array_equal(op(flipped), op(np.ascontiguousarray(flipped)))
        grey = op(img[..., :1])
        assert grey.shape == (20, 24, 1)
        np.testing.assert_array_equal(grey[..., 0], op(np.repeat(img[..., :1], 3, axis=2))[..., 0])


def test_transforms_without_normalisation_stop_at_uint8_and_the_vit_finishes_the_same():
    """The pipelines send uint8 images; normalize_images on the device gives the host
    normalisation's float32 values."""
    import jax.numpy as jnp

    from fine_jax.models.vit import normalize_images

    img = _textured(40, 52, seed=3)
    raw = I.train_transform(img, np.random.default_rng(9), 32, normalized=False)
    assert raw.dtype == np.uint8 and raw.shape == (32, 32, 3)
    host = I.train_transform(img, np.random.default_rng(9), 32)
    np.testing.assert_allclose(np.asarray(normalize_images(jnp.asarray(raw))), host, rtol=0,
                               atol=1e-6)
    test_raw = I.test_transform(img, 24, normalized=False)
    assert test_raw.dtype == np.uint8
    np.testing.assert_allclose(np.asarray(normalize_images(jnp.asarray(test_raw[None])))[0],
                               I.test_transform(img, 24), rtol=0, atol=1e-6)
    # Float input is taken as normalised already.
    same = jnp.asarray(host)
    assert normalize_images(same) is same

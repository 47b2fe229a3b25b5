"""Image preprocessing for all stages (method spec §6.4, the ALBEF recipe).

Everything here works on numpy ``uint8`` HWC arrays and is a plain module-level function, so it can be
pickled into grain worker processes. Every random choice is drawn from a ``np.random.Generator`` that
the caller passes in: the same image with the same generator state gives identical pixels.
The uint8 results of the individual ops may be read-only (they are often views of PIL buffers); copy
before writing into them. ``normalize``, ``train_transform`` and ``test_transform`` return fresh,
writable float32 arrays.

Train transform (ALBEF ``create_dataset``)::

    RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic)
    -> RandomHorizontalFlip(p=0.5)
    -> RandomAugment(N=2, M=7, augs=RANDAUG_OPS)          # ALBEF dataset/randaugment.py
    -> ToTensor -> Normalize(CLIP_MEAN, CLIP_STD)

Test transform: Resize((size, size), bicubic) -> ToTensor -> Normalize.

Fidelity to the reference ops (ALBEF implements them with numpy + OpenCV):

* AutoContrast, Equalize and Brightness are re-implemented with the same arithmetic (numpy, with
  PIL's ``histogram``/``point`` as fast C loops for histograms and table lookups), so they give the
  reference's pixels exactly.
* Sharpness (``cv2.filter2D``) and ShearX/ShearY/TranslateX/TranslateY/Rotate (``cv2.warpAffine``,
  INTER_LINEAR, constant border, ``cv2.getRotationMatrix2D``) call OpenCV with the reference's
  arguments. Their pixels are OpenCV's: the filter is the same in every version, but OpenCV 5
  changed INTER_LINEAR warping from 4.x's 1/32-px fixed-point weights to floating point, so on
  non-integer shifts (shear, rotation, fractional translation) OpenCV 5 and the reference's 4.x
  differ by a few levels; integer translations and quarter turns agree. PIL's
  ``Image.transform`` is not equivalent (half-pixel offset convention, no blending with the fill
  at the edges), which is why it is not used here.
* RandomResizedCrop and Resize are PIL bicubic resizes, which is what torchvision runs on PIL images;
  normalize performs torchvision's float32 operations, so its output has the same bits.
* The reference has two numeric quirks that change pixels; both are reproduced when
  ``albef_quirks=True`` (the default) and fixed when it is False:

  - AutoContrast computes ``offset = -low * scale`` with ``low`` a ``np.uint8`` scalar, so the negation
    wraps to ``256 - low``; every channel whose minimum is > 0 (and max > min) becomes all 255.
  - Sharpness casts the unclipped float32 blend with ``astype(np.uint8)``; on x86 this truncates to an
    integer and wraps modulo 256, so overshoots past 255 (factor 1.36 at M=7) turn dark and undershoots
    below 0 turn bright. The quirk mode reproduces the x86 behaviour explicitly, independent of the
    host CPU; the fixed mode clips to [0, 255] first.

* The random draws follow the reference's order and comparison directions, but come from a numpy
  ``Generator`` instead of torch's and numpy's global RNGs, so the streams themselves differ.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

# OpenCV would otherwise run each call on a thread pool as wide as the machine, in every process.
# The ops work on one small image at a time inside grain workers (processes or threads) that
# already occupy the cores, so that pool would only oversubscribe the CPU.
cv2.setNumThreads(0)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FILL = (128, 128, 128)
MAX_LEVEL = 10
TRANSLATE_CONST = 10
RANDAUG_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

_MEAN32 = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD32 = np.asarray(CLIP_STD, dtype=np.float32)


class CorruptImage(Exception):
    """One record's image is missing or cannot be decoded. Sources raise it for that record only,
    so that a training pipeline can count the record, replace it and go on (see
    :func:`fine_jax.data.pipeline.read_or_replace`)."""


def load_image_file(path: str) -> np.ndarray:
    """An image file (PNG, JPEG, ...) as RGB uint8 HWC, like the reference's
    ``Image.open(path).convert('RGB')``; a missing or undecodable file is a :class:`CorruptImage`."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise CorruptImage(f"image file not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise CorruptImage(f"image file cannot be decoded: {path}: {e}") from e


def _check_hwc(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"expected a uint8 HWC array, got {img.dtype} with shape {img.shape}")


# --------------------------------------------------------------------------------------------------
# Normalisation and resizing
# --------------------------------------------------------------------------------------------------
def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 HWC, ``(x / 255 - CLIP_MEAN) / CLIP_STD`` per channel.

    The same float32 operations as torchvision's ToTensor (``float(x) / 255``) and Normalize
    (``(t - mean) / std``), so the output has the same bits.
    """
    _check_hwc(img)
    h, w, c = img.shape
    if c != 3:
        raise ValueError(f"normalize expects 3 channels, got {c}")
    # Rows of w*c values with per-row tiled mean/std: numpy's inner loops then run over whole rows
    # instead of 3-element pixels, which is several times faster.
    x = img.astype(np.float32).reshape(h, w * c)
    x /= np.float32(255.0)
    x -= np.tile(_MEAN32, w)
    x /= np.tile(_STD32, w)
    return x.reshape(h, w, c)


def _resize_pil(img: np.ndarray, height: int, width: int, interpolation: str) -> Image.Image:
    try:
        resample = _PIL_RESAMPLE[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}") from None
    return Image.fromarray(np.ascontiguousarray(img)).resize((width, height), resample)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize(img: np.ndarray, size: int | Sequence[int], interpolation: str = "bicubic") -> np.ndarray:
    """PIL resize to ``(size, size)`` (int) or ``(h, w)``; no aspect-ratio preservation.

    Same as torchvision ``Resize((h, w))`` on a PIL image, which calls ``PIL.Image.resize``.
    """
    _check_hwc(img)
    return np.asarray(_resize_pil(img, *_size_hw(size), interpolation))


def random_resized_crop_params(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: returns ``(top, left, h, w)``.

    Up to 10 attempts with area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); a candidate is
    accepted when it fits. Otherwise the fallback is a central crop clamped to the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        # Python's round (half to even) on purpose: torchvision uses it.
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def random_resized_crop(
    img: np.ndarray,
    rng: np.random.Generator,
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    interpolation: str = "bicubic",
) -> np.ndarray:
    """torchvision ``RandomResizedCrop`` on a uint8 HWC array: crop, then PIL resize (bicubic).

    Cropping before resizing (rather than ``resize(box=...)``) matters: it clamps the bicubic filter
    support at the crop edges, as torchvision's ``crop`` + ``resize`` does.
    """
    _check_hwc(img)
    i, j, h, w = random_resized_crop_params(img.shape[0], img.shape[1], rng, scale, ratio)
    return np.asarray(_resize_pil(img[i:i + h, j:j + w], *_size_hw(size), interpolation))


def horizontal_flip(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


# --------------------------------------------------------------------------------------------------
# RandAugment ops (ALBEF dataset/randaugment.py)
# --------------------------------------------------------------------------------------------------
def identity(img: np.ndarray) -> np.ndarray:
    return img


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _to_pil(img: np.ndarray) -> Image.Image | None:
    mode = _PIL_MODES.get(img.shape[2])
    if mode is None:
        return None
    arr = np.ascontiguousarray(img[..., 0] if img.shape[2] == 1 else img)
    return Image.fromarray(arr, mode)


def _from_pil(pil: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(pil)
    return out[..., None] if channels == 1 else out


def _channel_histograms(img: np.ndarray) -> np.ndarray:
    """(C, 256) int64 per-channel histograms (PIL's C loop when the mode allows it)."""
    pil = _to_pil(img)
    c = img.shape[2]
    if pil is not None:
        return np.asarray(pil.histogram(), dtype=np.int64).reshape(c, 256)
    return np.stack([np.bincount(img[..., k].reshape(-1), minlength=256) for k in range(c)])


def _apply_channel_luts(img: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """out[..., c] = luts[c][img[..., c]] for (C, 256) uint8 tables (PIL ``point`` when possible)."""
    c = img.shape[2]
    pil = _to_pil(img)
    if pil is not None:
        return _from_pil(pil.point(luts.reshape(-1).tolist()), c)
    h, w = img.shape[:2]
    idx = img.astype(np.int64).reshape(h, w * c)
    idx += np.tile(np.arange(c) * 256, w)
    return np.take(luts.reshape(-1), idx).reshape(h, w, c)


def autocontrast(img: np.ndarray, albef_quirks: bool = True) -> np.ndarray:
    """ALBEF ``autocontrast_func`` (cutoff=0): per channel, stretch [min, max] to [0, 255].

    Table = clip(arange(256) * scale + offset, 0, 255) truncated to uint8, scale = 255 / (max - min),
    identity when max <= min. With ``albef_quirks`` the offset is ``(256 - min) % 256 * scale``,
    reproducing the reference's uint8 negation wrap (channels with min > 0 saturate to 255); without
    it the offset is the intended ``-min * scale``.
    """
    _check_hwc(img)
    hist = _channel_histograms(img)
    ar = np.arange(256)
    luts = np.empty((img.shape[2], 256), dtype=np.uint8)
    for c in range(img.shape[2]):
        nz = np.flatnonzero(hist[c])
        low, high = int(nz[0]), int(nz[-1])
        if high <= low:
            luts[c] = ar
            continue
        scale = 255 / (high - low)
        offset = ((-low) % 256) * scale if albef_quirks else -low * scale
        table = ar * scale + offset
        table[table < 0] = 0
        table[table > 255] = 255
        luts[c] = table.astype(np.uint8)
    return _apply_channel_luts(img, luts)


def equalize(img: np.ndarray) -> np.ndarray:
    """ALBEF ``equalize_func`` (= PIL ``ImageOps.equalize``), per channel.

    step = (sum of the non-zero histogram bins except the last one) // 255; channels with step 0 are
    unchanged; table[i] = (step // 2 + sum(hist[:i])) // step, clipped to 255.
    """
    _check_hwc(img)
    hists = _channel_histograms(img)
    c = img.shape[2]
    luts = np.empty((c, 256), dtype=np.uint8)
    ar = np.arange(256, dtype=np.uint8)
    for k in range(c):
        hist = hists[k]
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            luts[k] = ar
            continue
        n = np.empty(256, dtype=np.int64)
        n[0] = step // 2
        n[1:] = hist[:-1]
        luts[k] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)
    return _apply_channel_luts(img, luts)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """ALBEF ``brightness_func``: table = clip(float32 arange(256) * factor, 0, 255), truncated."""
    _check_hwc(img)
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return _apply_channel_luts(img, np.broadcast_to(table, (img.shape[2], 256)))


def _x86_float_to_uint8(x: np.ndarray) -> np.ndarray:
    # numpy's float32 -> uint8 cast of out-of-range values is C undefined behaviour; on x86 (where the
    # reference ran) it truncates toward zero to int32 and keeps the low byte. Spelled out here so the
    # result does not depend on the host CPU.
    return x.astype(np.int32).astype(np.uint8)


def _cv2_input(img: np.ndarray) -> np.ndarray:
    # OpenCV rejects arrays with negative or non-unit pixel strides (e.g. a flipped view).
    return np.ascontiguousarray(img)


def _cv2_output(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    # OpenCV returns single-channel images as 2-D arrays; keep the HWC contract.
    return out.reshape(like.shape)


_SMOOTH_KERNEL = np.ones((3, 3), dtype=np.float32)
_SMOOTH_KERNEL[1, 1] = 5
_SMOOTH_KERNEL /= 13


def sharpness(img: np.ndarray, factor: float, albef_quirks: bool = True) -> np.ndarray:
    """ALBEF ``sharpness_func``.

    degenerate = cv2.filter2D(img, kernel [[1,1,1],[1,5,1],[1,1,1]] / 13) (reflect-101 borders,
    rounded to uint8); for factor not in {0, 1} only the interior (1-px border left untouched)
    becomes ``degenerate + factor * (img - degenerate)`` in float32, then cast to uint8 (see the
    module docstring for the quirk). factor == 0 returns the filtered image, 1 the input.
    """
    _check_hwc(img)
    if factor == 1.0:
        return img
    h, w = img.shape[:2]
    if factor != 0.0 and (h < 3 or w < 3):
        return img  # no interior: the reference's blend touches no pixel
    degenerate = _cv2_output(cv2.filter2D(_cv2_input(img), -1, _SMOOTH_KERNEL), img)
    if factor == 0.0:
        return degenerate
    degf = degenerate[1:-1, 1:-1].astype(np.float32)
    # Same float32 operations as the reference's degenerate + factor * (img - degenerate).
    blended = img[1:-1, 1:-1].astype(np.float32)
    blended -= degf
    blended *= np.float32(factor)
    blended += degf
    out = img.copy()
    if albef_quirks:
        out[1:-1, 1:-1] = _x86_float_to_uint8(blended)
    else:
        np.clip(blended, 0, 255, out=blended)
        out[1:-1, 1:-1] = blended.astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------------
# Geometric ops: cv2.warpAffine (INTER_LINEAR, constant border), as the reference calls them
# --------------------------------------------------------------------------------------------------
def _warp(img: np.ndarray, matrix: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    _check_hwc(img)
    h, w = img.shape[:2]
    out = cv2.warpAffine(_cv2_input(img), matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(v) for v in fill))
    return _cv2_output(out, img)


def shear_x(img: np.ndarray, factor: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """ALBEF ``shear_x_func``: x_dst = x_src + factor * y_src, about the top-left corner."""
    m = np.array([[1, factor, 0], [0, 1, 0]], dtype=np.float32)  # float32 like the reference
    return _warp(img, m, fill)


def shear_y(img: np.ndarray, factor: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """ALBEF ``shear_y_func``: y_dst = y_src + factor * x_src, about the top-left corner."""
    m = np.array([[1, 0, 0], [factor, 1, 0]], dtype=np.float32)
    return _warp(img, m, fill)


def translate_x(img: np.ndarray, offset: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """ALBEF ``translate_x_func``: out[y, x] = img[y, x + offset] (positive offset moves content left)."""
    m = np.array([[1, 0, -offset], [0, 1, 0]], dtype=np.float32)
    return _warp(img, m, fill)


def translate_y(img: np.ndarray, offset: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """ALBEF ``translate_y_func``: out[y, x] = img[y + offset, x] (positive offset moves content up)."""
    m = np.array([[1, 0, 0], [0, 1, -offset]], dtype=np.float32)
    return _warp(img, m, fill)


def rotate(img: np.ndarray, degrees: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """ALBEF ``rotate_func``: rotate about (W/2, H/2) by ``degrees`` (positive = counter-clockwise
    on screen), same output size."""
    h, w = img.shape[:2]
    return _warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1), fill)


# --------------------------------------------------------------------------------------------------
# RandomAugment
# --------------------------------------------------------------------------------------------------
def apply_op(
    img: np.ndarray,
    name: str,
    level: float,
    rng: np.random.Generator,
    albef_quirks: bool = True,
) -> np.ndarray:
    """Apply one RandAugment op at ``level`` (out of MAX_LEVEL) with ALBEF's level -> argument maps.

    Signed ops draw their sign from ``rng``, with the reference's comparison direction (shear and
    translate negate when ``random() > 0.5``, rotate when ``random() < 0.5``).
    """
    frac = level / MAX_LEVEL
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return autocontrast(img, albef_quirks=albef_quirks)
    if name == "Equalize":
        return equalize(img)
    if name == "Brightness":
        return brightness(img, frac * 1.8 + 0.1)
    if name == "Sharpness":
        return sharpness(img, frac * 1.8 + 0.1, albef_quirks=albef_quirks)
    if name in ("ShearX", "ShearY"):
        v = frac * 0.3
        if rng.random() > 0.5:
            v = -v
        return (shear_x if name == "ShearX" else shear_y)(img, v, FILL)
    if name in ("TranslateX", "TranslateY"):
        v = frac * float(TRANSLATE_CONST)
        if rng.random() > 0.5:
            v = -v
        return (translate_x if name == "TranslateX" else translate_y)(img, v, FILL)
    if name == "Rotate":
        v = frac * 30
        if rng.random() < 0.5:
            v = -v
        return rotate(img, v, FILL)
    raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment(
    img: np.ndarray,
    rng: np.random.Generator,
    n: int = 2,
    m: float = 7,
    ops: Sequence[str] = RANDAUG_OPS,
    prob: float = 0.5,
    albef_quirks: bool = True,
) -> np.ndarray:
    """ALBEF ``RandomAugment(N=n, M=m, isPIL=False, augs=ops)``.

    Draw ``n`` ops uniformly with replacement; each is skipped when ``random() > prob``, else applied
    at level ``m``.
    """
    _check_hwc(img)
    if n <= 0:
        return img
    chosen = rng.integers(0, len(ops), size=n)
    for k in chosen:
        if rng.random() > prob:
            continue
        img = apply_op(img, ops[int(k)], m, rng, albef_quirks=albef_quirks)
    return img


# --------------------------------------------------------------------------------------------------
# Full transforms
# --------------------------------------------------------------------------------------------------
def train_transform(
    img: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True,
    randaug_n: int = 2,
    randaug_m: float = 7,
    albef_quirks: bool = True,
    normalized: bool = True,
) -> np.ndarray:
    """RandomResizedCrop -> horizontal flip (p=0.5) -> RandAugment -> normalize; float32 HWC.

    ``normalized=False`` stops before the normalisation and returns the uint8 HWC image, a
    quarter of the bytes: the training pipelines send that, and the ViT normalises on the
    device with the same float32 operations (``fine_jax.models.vit.normalize_images``).

    The flip is done on the PIL image right after the resize (same pixels, one copy fewer); the draws
    keep the reference's order: crop parameters, flip, then RandAugment.
    """
    _check_hwc(img)
    i, j, h, w = random_resized_crop_params(img.shape[0], img.shape[1], rng, scale)
    pil = _resize_pil(img[i:i + h, j:j + w], *_size_hw(size), "bicubic")
    if hflip and rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = np.asarray(pil)
    if randaug_n > 0:
        out = rand_augment(out, rng, n=randaug_n, m=randaug_m, albef_quirks=albef_quirks)
    return normalize(out) if normalized else np.ascontiguousarray(out)


def test_transform(img: np.ndarray, size: int, normalized: bool = True) -> np.ndarray:
    """Resize((size, size), bicubic) -> normalize; float32 HWC (uint8 HWC without the
    normalisation when ``normalized=False``)."""
    out = resize(img, size)
    return normalize(out) if normalized else np.ascontiguousarray(out)

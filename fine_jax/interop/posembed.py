"""ViT position embeddings for another patch grid, as the reference resizes them (method_spec §1.2).

ALBEF's ``interpolate_pos_embed`` keeps the CLS embedding and resizes the grid part with
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``. That kernel is the cubic
convolution with a = -0.75, source coordinates ``(i + 0.5) * in / out - 0.5`` and the four taps
clamped to the border. The same arithmetic is written here in numpy so that converting does not
need torch; it agrees with PyTorch to float32 rounding.
"""
from __future__ import annotations

import math

import numpy as np

_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n,) fractional offsets -> (n, 4) weights of the taps at floor-1 .. floor+2."""

    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix M with out = M @ in along one axis."""
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, size_in - 1)
    matrix = np.zeros((size_out, size_in), np.float64)
    for k in range(4):
        np.add.at(matrix, (np.arange(size_out), taps[:, k]), weights[:, k])
    return matrix


def resize_grid(grid: np.ndarray, size_out: int) -> np.ndarray:
    """(h, w, D) -> (size_out, size_out, D), bicubic, align_corners=False."""
    rows = _resize_matrix(grid.shape[0], size_out)
    cols = _resize_matrix(grid.shape[1], size_out)
    out = np.einsum("ih,hwd->iwd", rows, grid.astype(np.float64))
    return np.einsum("jw,iwd->ijd", cols, out)


def interpolate_pos_embed(pos_embed: np.ndarray, num_tokens: int, num_extra_tokens: int = 1) -> np.ndarray:
    """(1, n_in, D) -> (1, num_tokens, D); the first ``num_extra_tokens`` (CLS) are kept as they are.

    Both grids must be square, as in the reference. Returns the input unchanged when the grid
    already has the wanted size.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, width), got {pos_embed.shape}")
    if pos_embed.shape[1] == num_tokens:
        return pos_embed
    size_in = _grid_side(pos_embed.shape[1] - num_extra_tokens)
    size_out = _grid_side(num_tokens - num_extra_tokens)
    extra = pos_embed[:, :num_extra_tokens].astype(np.float32)
    grid = pos_embed[0, num_extra_tokens:].reshape(size_in, size_in, -1)
    resized = resize_grid(grid, size_out).reshape(1, size_out * size_out, -1).astype(np.float32)
    return np.concatenate([extra, resized], axis=1)


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch positions do not form a square grid")
    return side

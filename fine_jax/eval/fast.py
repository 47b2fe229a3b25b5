"""Exact ranking protocols on the devices: blocked, data-parallel, ties as the reference (§7).

:mod:`fine_jax.eval.retrieval` defines the FashionGen protocols on a similarity matrix held by the
host. This module computes the same numbers from the embeddings without ever holding the matrix:
the devices compute it tile by tile, count, and forget it; a device holds one
``block_rows x tile_cols`` tile at a time and the host only per-query vectors (O(n), plus
O(n x block) for the rare tie fallback).

The similarity matrix
---------------------
``S[i, t] = z_rows[i] . z_cols[t]`` in float32, computed by one tile program: the rows (images,
or TGIR queries) in blocks of ``block_rows`` sharded over the mesh, the columns (texts, or the
TGIR gallery) in tiles of ``tile_cols``, each tile one float32 ``dot_general`` at HIGHEST precision
fenced by ``optimization_barrier`` so that no consumer is fused into it. **The protocols are
defined on the matrix this program computes.** It is not bit-identical to NumPy's
``z_v @ z_t.T``: on XLA:CPU most entries differ from NumPy's in the last bit, and they also
depend on the tile width (the column count of one dot), though not on the block's row count (at
least 2) or the row's place in it. Every value used here - the positives, the counts, the
sample-100 candidate scores, the rows and columns re-ranked by the tie fallback - comes from that
same program on the same tiles, so every decision sees one consistent matrix, which is what the
reference's single score matrix gives. ``similarity_matrix`` materialises it (for tests at small
sizes), and ``retrieval.full_protocol(similarity_matrix(...))`` gives exactly the numbers of
:func:`full_protocol`.

Algorithm
---------
1. *Positives.* Rows are sorted by their positive column (stable), so each row block's positives
   fall in one or two column tiles; those tiles alone give every row's positive score
   ``S[i, pos(i)]`` (I2T threshold) and, per column, the best positive over its rows (T2I
   threshold, as ``itm_eval`` takes the best-ranked image of the product). This is a small
   fraction of the matrix.
2. *Counts.* One pass over all tiles counts, per row, the columns strictly greater than its
   positive, and per column the rows strictly greater than its threshold (summed over the mesh
   with ``psum``); the same pass gathers the sample-100 candidate scores.
3. *Ties.* A rank is the strict-greater count unless a competitor equals the positive or the
   row/column holds a NaN (numpy sorts NaN as largest); the pass counts those too (``== or NaN``),
   and only for such queries the row/column is recomputed by the same tile program and ranked on
   the host with the reference's literal ``np.argsort(score)[::-1]`` rule
   (``retrieval._argsort_position``), with the installed numpy. Sample-100 ties are ranked the
   same way on the float64 copy of the candidate scores, as ``itm_eval`` does.

Data parallelism: the row blocks are sharded over the mesh axes ``axis_names`` (several batch axes
such as ``("data", "fsdp")`` are flattened), the columns are replicated, per-column counts are
``psum``-ed and per-row results all-gathered. With no mesh, all local devices form a 1-D mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fine_jax.eval import retrieval as R

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_TILE_COLS",
    "Ranks",
    "FashionGenResult",
    "default_mesh",
    "similarity_matrix",
    "rank_rows",
    "full_ranks",
    "full_protocol",
    "sample100_protocol",
    "evaluate",
    "fashiongen_protocols",
    "topk_device",
]

DEFAULT_BLOCK_ROWS = 2048
DEFAULT_TILE_COLS = 512
# Counts are packed two to an int32 (greater | equal-or-NaN << 16), so a tile side must fit 16 bits.
_PACK_SHIFT = 16
_MAX_SIDE = (1 << _PACK_SHIFT) - 1
# Floats the tie fallback may hold on the host at once (rows or columns being re-ranked).
_FALLBACK_FLOATS = 1 << 24
_NO_POSITIVE_RANK = 100000  # itm_eval's initial rank: a product without images never hits


# ----------------------------------------------------------------------------------------------
# layout


def default_mesh(axis_names: Sequence[str] = ("data",)) -> Mesh:
    """All local devices on the first axis (the others of size 1)."""
    devices = np.asarray(jax.local_devices())
    shape = (devices.size,) + (1,) * (len(axis_names) - 1)
    return Mesh(devices.reshape(shape), tuple(axis_names))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each row and column of S lives in the padded, blocked, sharded arrays."""

    mesh: Mesh
    axes: tuple
    n_dev: int
    n_rows: int
    n_cols: int
    bi: int  # rows per block
    bt: int  # columns per tile
    n_blocks: int  # a multiple of n_dev
    n_tiles: int
    order: np.ndarray  # slot -> original row (rows sorted by positive column)
    slot: np.ndarray  # original row -> slot

    @property
    def row_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.axes))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def _make_layout(n_rows: int, n_cols: int, row_pos: np.ndarray | None, mesh: Mesh | None,
                 axis_names: Sequence[str], block_rows: int | None,
                 tile_cols: int | None) -> _Layout:
    axes = tuple(axis_names)
    mesh = mesh if mesh is not None else default_mesh(axes)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh has no axis {missing}; its axes are {tuple(mesh.shape)}")
    n_dev = int(np.prod([mesh.shape[a] for a in axes]))
    block_rows = DEFAULT_BLOCK_ROWS if block_rows is None else int(block_rows)
    tile_cols = DEFAULT_TILE_COLS if tile_cols is None else int(tile_cols)
    if not 2 <= block_rows <= _MAX_SIDE or not 1 <= tile_cols <= _MAX_SIDE:
        raise ValueError(f"block_rows must be in [2, {_MAX_SIDE}] and tile_cols in "
                         f"[1, {_MAX_SIDE}], got {block_rows}, {tile_cols}")
    if n_rows < 1 or n_cols < 1:
        raise ValueError("need at least one row and one column")
    # A one-row block would be a matrix-vector product, computed by another kernel.
    bi = max(2, min(block_rows, _round_up(-(-n_rows // n_dev), 8)))
    bt = min(tile_cols, _round_up(n_cols, 8))
    n_blocks = _round_up(-(-n_rows // bi), n_dev)
    n_tiles = -(-n_cols // bt)
    if row_pos is None:
        order = np.arange(n_rows)
    else:
        order = np.argsort(row_pos, kind="stable")
    slot = np.empty(n_rows, dtype=np.int64)
    slot[order] = np.arange(n_rows)
    return _Layout(mesh, axes, n_dev, n_rows, n_cols, bi, bt, n_blocks, n_tiles, order, slot)


@dataclasses.dataclass
class _Operands:
    lay: _Layout
    zr: jax.Array  # (n_blocks, bi, E) sharded over the blocks
    zc: jax.Array  # (n_tiles, bt, E) replicated
    zr_host: np.ndarray  # (n_blocks, bi, E) } host copies, from which the tie fallback packs
    zc_host: np.ndarray  # (n_tiles, bt, E)   } the few rows / columns it recomputes


def _as_f32(z, name: str) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {z.shape}")
    return z


def _operands(z_rows, z_cols, row_pos, mesh, axis_names, block_rows, tile_cols) -> _Operands:
    z_rows, z_cols = _as_f32(z_rows, "z_rows"), _as_f32(z_cols, "z_cols")
    if z_rows.shape[1] != z_cols.shape[1]:
        raise ValueError(f"embedding widths differ: {z_rows.shape[1]} vs {z_cols.shape[1]}")
    lay = _make_layout(len(z_rows), len(z_cols), row_pos, mesh, axis_names, block_rows,
                       tile_cols)
    dim = z_rows.shape[1]
    zr = np.zeros((lay.n_blocks * lay.bi, dim), np.float32)
    zr[:lay.n_rows] = z_rows[lay.order]
    zr = zr.reshape(lay.n_blocks, lay.bi, dim)
    zc = np.zeros((lay.n_tiles * lay.bt, dim), np.float32)
    zc[:lay.n_cols] = z_cols
    zc = zc.reshape(lay.n_tiles, lay.bt, dim)
    return _Operands(lay, jax.device_put(zr, lay.row_sharding),
                     jax.device_put(zc, lay.replicated), zr, zc)


def _put_rows(lay: _Layout, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, lay.row_sharding)


def _put_all(lay: _Layout, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, lay.replicated)


# ----------------------------------------------------------------------------------------------
# device programs (built once per mesh and static configuration; jit caches the shapes)


def _tile(x: jax.Array, t: jax.Array) -> jax.Array:
    """One tile of S. The barriers keep the dot a standalone op with materialised operands, so
    every program that calls this computes bit-identical tiles from the same inputs."""
    x, t = jax.lax.optimization_barrier((x, t))
    s = jax.lax.dot_general(x, t, (((1,), (1,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(s)


def _gather(x, axes):
    return jax.lax.all_gather(x, axes, axis=0, tiled=True)


def _smap(fn, mesh: Mesh, in_specs, out_specs):
    # The carries start replicated and become per-device inside the scans; the all_gather / psum
    # outputs are replicated by construction, so the varying-axes check adds nothing here.
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False))


@functools.lru_cache(maxsize=None)
def _positives_program(mesh: Mesh, axes: tuple):
    """Per row, S[row, pos(row)], from the few tiles holding the block's positives."""
    lay_specs = P(axes)

    def local(zr, zc, pos_tile, pos_local, tiles):
        def block(_, xs):
            x, pt, pl, tl = xs

            def step(pos, a):
                s = _tile(x, zc[a])
                v = jnp.take_along_axis(s, pl[:, None], axis=1)[:, 0]
                return jnp.where(pt == a, v, pos), None

            pos, _ = jax.lax.scan(step, jnp.zeros(x.shape[0], jnp.float32), tl)
            return None, pos

        _, pos = jax.lax.scan(block, None, (zr, pos_tile, pos_local, tiles))
        return _gather(pos, axes)

    return _smap(local, mesh, (lay_specs, P(), lay_specs, lay_specs, lay_specs), P())


def _packed_counts(s, thr, axis):
    """Along ``axis``: #(s > thr) in the low 16 bits and, above, #(neither greater nor less),
    i.e. equal or NaN (either side)."""
    v = jnp.where(s > thr, 1, jnp.where(s < thr, 0, 1 << _PACK_SHIFT))
    v = jnp.sum(v, axis=axis, dtype=jnp.int32)
    return v & _MAX_SIDE, v >> _PACK_SHIFT


@functools.lru_cache(maxsize=None)
def _counts_program(mesh: Mesh, axes: tuple, do_rows: bool, do_cols: bool, do_entries: bool):
    """The main pass: per-row and per-column counts against the thresholds, plus the values of
    the listed entries (sample-100 candidates)."""
    rows = P(axes)

    def local(zr, zc, thr_row, thr_col, ent):
        bi = zr.shape[1]
        nt, bt = thr_col.shape

        def block(col_acc, xs):
            x, tr, en = xs

            def step(row_acc, ys):
                t, tc, e = ys
                s = _tile(x, t)
                out = {}
                if do_rows:
                    gt, eq = _packed_counts(s, tr[:, None], 1)
                    row_acc = (row_acc[0] + gt, row_acc[1] + eq)
                if do_cols:
                    out["col"] = _packed_counts(s, tc[None, :], 0)
                if do_entries:
                    out["ent"] = s.reshape(-1)[e]
                return row_acc, out

            zero = jnp.zeros(bi, jnp.int32)
            row_acc, out = jax.lax.scan(step, (zero, zero), (zc, thr_col, en))
            if do_cols:
                col_acc = (col_acc[0] + out["col"][0], col_acc[1] + out["col"][1])
            return col_acc, (row_acc, out.get("ent", jnp.zeros((nt, 0), jnp.float32)))

        zero = jnp.zeros((nt, bt), jnp.int32)
        col_acc, (row_acc, ent_vals) = jax.lax.scan(block, (zero, zero), (zr, thr_row, ent))
        col_acc = jax.lax.psum(col_acc, axes)
        return (_gather(row_acc[0], axes), _gather(row_acc[1], axes), col_acc[0], col_acc[1],
                _gather(ent_vals, axes))

    return _smap(local, mesh, (rows, P(), rows, P(), rows), (P(),) * 5)


@functools.lru_cache(maxsize=None)
def _rows_program(mesh: Mesh, axes: tuple):
    """Whole rows of S for some rows of the given (packed) blocks: the I2T / TGIR tie fallback."""
    def local(zr, zc, rows):
        def block(_, xs):
            x, r = xs
            _, out = jax.lax.scan(lambda c, t: (c, _tile(x, t)[r]), None, zc)
            return None, out  # (n_tiles, R, bt)

        _, out = jax.lax.scan(block, None, (zr, rows))
        return _gather(out, axes)

    return _smap(local, mesh, (P(axes), P(), P(axes)), P())


@functools.lru_cache(maxsize=None)
def _cols_program(mesh: Mesh, axes: tuple):
    """Whole columns of S for some columns of the given (packed) tiles: the T2I tie fallback."""
    def local(zr, tiles, cols):
        def block(_, x):
            _, out = jax.lax.scan(lambda c, ys: (c, _tile(x, ys[0])[:, ys[1]]), None,
                                  (tiles, cols))
            return None, out  # (n_packed, bi, C)

        _, out = jax.lax.scan(block, None, zr)
        return _gather(out, axes)

    return _smap(local, mesh, (P(axes), P(), P()), P())


@functools.lru_cache(maxsize=None)
def _tiles_program(mesh: Mesh, axes: tuple):
    def local(zr, zc):
        def block(_, x):
            _, out = jax.lax.scan(lambda c, t: (c, _tile(x, t)), None, zc)
            return None, out

        _, out = jax.lax.scan(block, None, zr)
        return _gather(out, axes)

    return _smap(local, mesh, (P(axes), P()), P())


@functools.lru_cache(maxsize=None)
def _topk_program(mesh: Mesh, axes: tuple, k: int):
    def local(zq, zg, gvalid):
        nt, bt = gvalid.shape

        def block(_, x):
            def scored(t, valid, a):
                s = _tile(x, t)
                s = jnp.where(valid[None, :] & ~jnp.isnan(s), s, -jnp.inf)
                return s, jnp.broadcast_to(a * bt + jnp.arange(bt, dtype=jnp.int32), s.shape)

            s, i = scored(zg[0], gvalid[0], 0)
            v, j = jax.lax.top_k(s, k)
            best = (v, jnp.take_along_axis(i, j, axis=1))

            def step(best, ys):
                # The running list holds lower gallery indices than this tile and comes first,
                # so top_k's lower-position-first rule breaks ties by the lower index.
                s, i = scored(*ys)
                cat_v = jnp.concatenate([best[0], s], axis=1)
                cat_i = jnp.concatenate([best[1], i], axis=1)
                v, j = jax.lax.top_k(cat_v, k)
                return (v, jnp.take_along_axis(cat_i, j, axis=1)), None

            best, _ = jax.lax.scan(step, best, (zg[1:], gvalid[1:],
                                                jnp.arange(1, nt, dtype=jnp.int32)))
            return None, best

        _, (v, i) = jax.lax.scan(block, None, zq)
        return _gather(v, axes), _gather(i, axes)

    return _smap(local, mesh, (P(axes), P(), P()), (P(), P()))


@jax.jit
def _rank_last(vals, idx, valid, last):
    """Per candidate list: #(score > positive) and whether the position depends on ties/NaN."""
    s = vals.reshape(-1)[idx]
    s = jnp.where(valid, s, jnp.nan)
    p = jnp.take_along_axis(s, last[:, None], axis=1)
    gt = jnp.sum(valid & (s > p), axis=1)
    eq = jnp.sum(valid & ((s == p) | jnp.isnan(s)), axis=1)
    return s, gt, (eq != 1) | jnp.isnan(p[:, 0])


# ----------------------------------------------------------------------------------------------
# host orchestration


def _valid_masks(lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    row_valid = (np.arange(lay.n_blocks * lay.bi) < lay.n_rows).reshape(lay.n_blocks, lay.bi)
    col_valid = (np.arange(lay.n_tiles * lay.bt) < lay.n_cols).reshape(lay.n_tiles, lay.bt)
    return row_valid, col_valid


def _positives(ops: _Operands, row_pos: np.ndarray) -> np.ndarray:
    """S[i, row_pos[i]] for every row, in original row order."""
    lay = ops.lay
    pos_sorted = np.zeros(lay.n_blocks * lay.bi, np.int64)
    pos_sorted[:lay.n_rows] = row_pos[lay.order]
    pos_tile = (pos_sorted // lay.bt).reshape(lay.n_blocks, lay.bi)
    pos_local = (pos_sorted % lay.bt).reshape(lay.n_blocks, lay.bi)
    valid = _valid_masks(lay)[0]
    # Rows are sorted by positive, so a block's positives lie in a contiguous range of tiles.
    lo = np.where(valid, pos_tile, np.iinfo(np.int64).max).min(axis=1)
    hi = np.where(valid, pos_tile, -1).max(axis=1)
    lo = np.where(hi < 0, 0, lo)
    n_k = int(max(1, (hi - lo + 1).max()))
    tiles = np.minimum(lo[:, None] + np.arange(n_k)[None, :], lay.n_tiles - 1)
    prog = _positives_program(lay.mesh, lay.axes)
    pos = np.asarray(prog(ops.zr, ops.zc, _put_rows(lay, pos_tile.astype(np.int32)),
                          _put_rows(lay, pos_local.astype(np.int32)),
                          _put_rows(lay, tiles.astype(np.int32))))
    out = np.empty(lay.n_rows, np.float32)
    out[lay.order] = pos.reshape(-1)[:lay.n_rows]
    return out


@dataclasses.dataclass
class _Entries:
    """Entries (row, col) of S to gather during the counting pass."""

    idx: np.ndarray  # (n_blocks, n_tiles, n_per_tile) flat index into the tile
    flat: np.ndarray  # (n,) position of each entry in the gathered output


def _entries(lay: _Layout, rows: np.ndarray, cols: np.ndarray) -> _Entries:
    slot = lay.slot[rows]
    key = (slot // lay.bi) * lay.n_tiles + cols // lay.bt
    local = (slot % lay.bi) * lay.bt + cols % lay.bt
    n_keys = lay.n_blocks * lay.n_tiles
    counts = np.bincount(key, minlength=n_keys)
    width = int(max(1, counts.max())) if len(key) else 1
    # Few distinct keys: a 16-bit key sorts by radix, in linear time.
    perm = np.argsort(key.astype(np.uint16) if n_keys <= 1 << 16 else key, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = np.empty(len(key), np.int64)
    within[perm] = np.arange(len(key)) - starts[key[perm]]
    idx = np.zeros((n_keys, width), np.int32)
    idx[key, within] = local
    return _Entries(idx.reshape(lay.n_blocks, lay.n_tiles, width), key * width + within)


def _count_pass(ops: _Operands, *, thr_row: np.ndarray | None, thr_col: np.ndarray | None,
                entries: _Entries | None):
    """Runs the main pass; thresholds in original row / column order."""
    lay = ops.lay
    tr = np.zeros(lay.n_blocks * lay.bi, np.float32)
    if thr_row is not None:
        tr[:lay.n_rows] = thr_row[lay.order]
    tc = np.zeros(lay.n_tiles * lay.bt, np.float32)
    if thr_col is not None:
        tc[:lay.n_cols] = thr_col
    ent = (entries.idx if entries is not None
           else np.zeros((lay.n_blocks, lay.n_tiles, 1), np.int32))
    prog = _counts_program(lay.mesh, lay.axes, thr_row is not None, thr_col is not None,
                           entries is not None)
    rg, re, cg, ce, vals = prog(ops.zr, ops.zc,
                                _put_rows(lay, tr.reshape(lay.n_blocks, lay.bi)),
                                _put_all(lay, tc.reshape(lay.n_tiles, lay.bt)),
                                _put_rows(lay, ent))

    def rows_back(x):
        out = np.empty(lay.n_rows, np.int64)
        out[lay.order] = np.asarray(x).reshape(-1)[:lay.n_rows]
        return out

    # The padding rows and columns are zero vectors, so against a finite embedding their S is
    # exactly 0: remove them from the counts here instead of masking every tile. (A non-finite
    # embedding makes its positive or threshold non-finite, and those queries are re-ranked by
    # the fallback whatever the counts say.)
    row = col = None
    if thr_row is not None:
        pad = lay.n_tiles * lay.bt - lay.n_cols
        gt, eq = rows_back(rg), rows_back(re)
        row = (gt - pad * (thr_row < 0), eq - pad * (thr_row == 0))
    if thr_col is not None:
        pad = lay.n_blocks * lay.bi - lay.n_rows
        gt = np.asarray(cg).reshape(-1)[:lay.n_cols].astype(np.int64)
        eq = np.asarray(ce).reshape(-1)[:lay.n_cols].astype(np.int64)
        col = (gt - pad * (thr_col < 0), eq - pad * (thr_col == 0))
    return row, col, vals


def _pack(local: np.ndarray) -> list[list[int]]:
    """Groups items by their in-tile position so that no group holds a position twice: item
    indices per group. Re-computing an item in a packed block or tile at its own position gives
    the same bits as in its own block or tile (an entry of a tile depends only on its row, its
    column and its place in the tile), at a fraction of the cost of its whole block or tile."""
    groups: list[list[int]] = []
    seen: dict[int, int] = {}
    for j, p in enumerate(local.tolist()):
        g = seen.get(p, 0)
        seen[p] = g + 1
        if g == len(groups):
            groups.append([])
        groups[g].append(j)
    return groups


def _pow2(n: int) -> int:
    return 1 << max(0, int(np.ceil(np.log2(max(1, n)))))


def _fallback_rows(ops: _Operands, rows: np.ndarray):
    """Yields (original row, its full row of S) for the given rows, recomputed by the tile
    program with each row at its own place in a packed block."""
    lay = ops.lay
    width = lay.n_tiles * lay.bt
    per_call = max(1, _FALLBACK_FLOATS // width)
    prog = _rows_program(lay.mesh, lay.axes)
    for s0 in range(0, len(rows), per_call):
        chunk = rows[s0:s0 + per_call]
        slots = lay.slot[chunk]
        local = slots % lay.bi
        groups = _pack(local)
        n_blk = _round_up(len(groups), lay.n_dev)
        n_r = min(_pow2(max(len(g) for g in groups)), lay.bi)
        blocks = np.zeros((n_blk, lay.bi, ops.zr_host.shape[2]), np.float32)
        loc = np.zeros((n_blk, n_r), np.int32)
        for j, g in enumerate(groups):
            g = np.asarray(g)
            blocks[j, local[g]] = ops.zr_host.reshape(-1, blocks.shape[2])[slots[g]]
            loc[j, :len(g)] = local[g]
        out = np.asarray(prog(_put_rows(lay, blocks), ops.zc, _put_rows(lay, loc)))
        # (n_blk, n_tiles, n_r, bt) -> (n_blk, n_r, n_cols)
        out = out.transpose(0, 2, 1, 3).reshape(n_blk, n_r, width)[:, :, :lay.n_cols]
        for j, g in enumerate(groups):
            for m, i in enumerate(g):
                yield int(chunk[i]), out[j, m]


def _fallback_cols(ops: _Operands, cols: np.ndarray):
    """Yields (column, its full column of S in original row order) for the given columns,
    recomputed by the tile program with each column at its own place in a packed tile."""
    lay = ops.lay
    per_call = max(1, _FALLBACK_FLOATS // (lay.n_blocks * lay.bi))
    prog = _cols_program(lay.mesh, lay.axes)
    zc = ops.zc_host.reshape(lay.n_tiles * lay.bt, -1)
    for s0 in range(0, len(cols), per_call):
        chunk = np.asarray(cols[s0:s0 + per_call])
        local = chunk % lay.bt
        groups = _pack(local)
        n_c = _pow2(max(len(g) for g in groups))
        tiles = np.zeros((len(groups), lay.bt, zc.shape[1]), np.float32)
        loc = np.zeros((len(groups), n_c), np.int32)
        for j, g in enumerate(groups):
            g = np.asarray(g)
            tiles[j, local[g]] = zc[chunk[g]]
            loc[j, :len(g)] = local[g]
        out = np.asarray(prog(ops.zr, _put_all(lay, tiles), _put_all(lay, loc)))
        # (n_blocks, n_packed, bi, n_c) -> (n_packed, n_c, rows in slot order)
        out = out.transpose(1, 3, 0, 2).reshape(len(groups), n_c, -1)[:, :, :lay.n_rows]
        for j, g in enumerate(groups):
            for m, i in enumerate(g):
                col = np.empty(lay.n_rows, np.float32)
                col[lay.order] = out[j, m]
                yield int(chunk[i]), col


@dataclasses.dataclass
class Ranks:
    """0-based ranks of each query's positive and whether each one needed the tie fallback."""

    i2t: np.ndarray
    t2i: np.ndarray | None
    i2t_tied: np.ndarray
    t2i_tied: np.ndarray | None


def _check_row_pos(row_pos, n_rows: int, n_cols: int, name: str) -> np.ndarray:
    row_pos = np.asarray(row_pos, dtype=np.int64).reshape(-1)
    if row_pos.shape != (n_rows,):
        raise ValueError(f"{name} must have shape ({n_rows},), got {row_pos.shape}")
    if row_pos.size and (row_pos.min() < 0 or row_pos.max() >= n_cols):
        raise ValueError(f"{name} holds an index outside [0, {n_cols})")
    return row_pos


def _ranks(ops: _Operands, row_pos: np.ndarray, *, cols: bool,
           entries: _Entries | None = None):
    """Row ranks (and column ranks when ``cols``) with the reference's tie rule; also returns the
    gathered entry values (device array) when ``entries`` is given."""
    lay = ops.lay
    pos = _positives(ops, row_pos)
    thr_col = pos_at_max = n_pos = None
    if cols:
        n_pos = np.bincount(row_pos, minlength=lay.n_cols)
        # Same operations as retrieval.t2i_ranks: the best positive, NaN propagating.
        pos_max = np.full(lay.n_cols, -np.inf, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            np.maximum.at(pos_max, row_pos, pos.astype(np.float64))
        thr_col = pos_max.astype(np.float32)
        pos_at_max = np.bincount(row_pos, weights=(pos == thr_col[row_pos]),
                                 minlength=lay.n_cols).astype(np.int64)
    row, col, vals = _count_pass(ops, thr_row=pos, thr_col=thr_col, entries=entries)

    rank_i = row[0].copy()
    # The positive counts itself once among the equal ones; anything else is a tie or a NaN.
    # A non-finite positive is always re-ranked: the padding correction assumes finite rows.
    tied_i = (row[1] != 1) | ~np.isfinite(pos)
    for r, score in _fallback_rows(ops, np.flatnonzero(tied_i)):
        rank_i[r] = R._argsort_position(score, (int(row_pos[r]),))
        # Report a tie exactly as retrieval.i2t_ranks counts one, from the row itself.
        tied_i[r] = np.count_nonzero(score == pos[r]) != 1 or np.isnan(score).any()
    if not cols:
        return Ranks(rank_i, None, tied_i, None), vals

    rank_t = col[0].copy()
    tied_t = (((col[1] - pos_at_max) != 0) | ~np.isfinite(thr_col)) & (n_pos > 0)
    if tied_t.any():
        bounds = np.concatenate([[0], np.cumsum(n_pos)])
        for c, score in _fallback_cols(ops, np.flatnonzero(tied_t)):
            rank_t[c] = R._argsort_position(score, lay.order[bounds[c]:bounds[c + 1]])
            tied_t[c] = (np.count_nonzero(score == thr_col[c]) != pos_at_max[c]
                         or np.isnan(score).any())
    rank_t[n_pos == 0] = _NO_POSITIVE_RANK
    return Ranks(rank_i, rank_t, tied_i, tied_t), vals


# ----------------------------------------------------------------------------------------------
# sample-100 on the devices


def _candidate_entries(cands: Mapping[str, Any], n_images: int, n_texts: int):
    """Entries (image, text) of every candidate of every query, positive last per query."""
    if cands.get("n_images", n_images) != n_images or cands.get("n_products", n_texts) != n_texts:
        raise ValueError("candidate sets were drawn for a different number of images/products")
    rows, cols, lens = [], [], []
    for direction in ("i2t", "t2i"):
        queries = cands[direction]
        if not queries:
            continue
        q = np.asarray([x[0] for x in queries], dtype=np.int64)
        pos = np.asarray([x[2] for x in queries], dtype=np.int64)
        n = np.asarray([len(x[1]) for x in queries], dtype=np.int64)
        if (n == n[0]).all():  # the usual case: one 2-D conversion
            c = np.asarray([x[1] for x in queries], dtype=np.int64).reshape(-1)
        else:
            c = np.concatenate([np.asarray(x[1], dtype=np.int64) for x in queries])
        if (n < 1).any() or (c[np.cumsum(n) - 1] != pos).any():
            raise ValueError(f"the positive must be the last {direction.upper()} candidate")
        qq = np.repeat(q, n)
        rows.append(qq if direction == "i2t" else c)
        cols.append(c if direction == "i2t" else qq)
        lens.append(n)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n_images or cols.min() < 0
                      or cols.max() >= n_texts):
        raise ValueError("candidate sets hold an index outside the images/products")
    return rows, cols, lens, len(cands["i2t"])


def _sample100_from_values(vals: jax.Array, flat_pos: np.ndarray, lens: np.ndarray,
                           n_i2t: int):
    """Ranks of the positive (last) among each query's candidates, from the gathered values."""
    n_q = len(lens)
    width = int(lens.max()) if n_q else 1
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    col = np.arange(width)[None, :]
    valid = col < lens[:, None]
    idx = np.where(valid, flat_pos[np.minimum(starts[:, None] + col, len(flat_pos) - 1)], 0)
    scores, gt, tied = _rank_last(vals, jnp.asarray(idx, jnp.int32), jnp.asarray(valid),
                                  jnp.asarray(lens - 1, jnp.int32))
    scores, ranks, tied = np.asarray(scores), np.asarray(gt).astype(np.int64), np.asarray(tied)
    for q in np.flatnonzero(tied):
        # itm_eval copies the candidate scores into a float64 array before sorting.
        score = np.asarray(scores[q, :lens[q]], dtype=np.float64)
        ranks[q] = R._argsort_position(score, (int(lens[q]) - 1,))
    return (ranks[:n_i2t], ranks[n_i2t:]), (tied[:n_i2t], tied[n_i2t:]), \
        (scores[:n_i2t], scores[n_i2t:])


@dataclasses.dataclass
class FashionGenResult:
    """Everything :func:`evaluate` computed: metrics dicts in the ``retrieval`` key layout, the
    per-query ranks, and each candidate set's candidate scores ((queries, candidates) float32,
    positive last; NaN after the end of a shorter list)."""

    full: dict | None
    full_ranks: Ranks | None
    sample100: dict[str, dict]
    sample100_ranks: dict[str, Ranks]
    sample100_scores: dict[str, tuple[np.ndarray, np.ndarray]]


def evaluate(z_v, z_t, img_product, candidate_sets: Mapping[str, Mapping[str, Any]] | None = None,
             *, full: bool = True, mesh: Mesh | None = None,
             axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
             tile_cols: int | None = None) -> FashionGenResult:
    """The full protocol (``full=True``) and sample-100 on every named candidate set, from one
    similarity matrix and one counting pass over it.

    ``z_v`` (n_images, E) and ``z_t`` (n_texts, E): L2-normalised embeddings (cast to float32);
    ``img_product`` (n_images,): product (= text) index of each image; ``candidate_sets``:
    ``{name: sets drawn by retrieval.sample100_candidates}``.
    """
    z_v, z_t = _as_f32(z_v, "z_v"), _as_f32(z_t, "z_t")
    img_product = _check_row_pos(img_product, len(z_v), len(z_t), "img_product")
    ops = _operands(z_v, z_t, img_product, mesh, axis_names, block_rows, tile_cols)
    lay = ops.lay
    candidate_sets = dict(candidate_sets or {})

    entries = None
    per_set = []
    if candidate_sets:
        rows, cols, lens = [], [], []
        for name, cands in candidate_sets.items():
            r, c, n, n_i2t = _candidate_entries(cands, lay.n_rows, lay.n_cols)
            per_set.append((name, sum(len(x) for x in lens), len(n), n_i2t))
            rows.append(r), cols.append(c), lens.append(n)
        rows, cols, lens = np.concatenate(rows), np.concatenate(cols), np.concatenate(lens)
        entries = _entries(lay, rows, cols)

    full_res = full_ranks_ = None
    if full:
        full_ranks_, vals = _ranks(ops, img_product, cols=True, entries=entries)
        full_res = R.full_metrics(full_ranks_.i2t, full_ranks_.t2i,
                                  int(full_ranks_.i2t_tied.sum()),
                                  int(full_ranks_.t2i_tied.sum()))
    elif entries is not None:
        _, _, vals = _count_pass(ops, thr_row=None, thr_col=None, entries=entries)

    s_metrics, s_ranks, s_scores = {}, {}, {}
    if per_set:
        starts = np.concatenate([[0], np.cumsum(lens)])
        for name, q0, n_q, n_i2t in per_set:
            sel = slice(int(starts[q0]), int(starts[q0 + n_q]))
            (ri, rt), (ti, tt), (si, st) = _sample100_from_values(
                vals, entries.flat[sel], lens[q0:q0 + n_q], n_i2t)
            s_ranks[name] = Ranks(ri, rt, ti, tt)
            s_scores[name] = (si, st)
            s_metrics[name] = R.sample100_metrics(ri, rt, int(ti.sum()), int(tt.sum()))
    return FashionGenResult(full_res, full_ranks_, s_metrics, s_ranks, s_scores)


def full_ranks(z_v, z_t, img_product, *, mesh: Mesh | None = None,
               axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
               tile_cols: int | None = None) -> Ranks:
    """Per-image I2T and per-text T2I ranks of the full protocol (``retrieval.i2t_ranks`` /
    ``t2i_ranks`` with ``ties="argsort"``, on the device matrix)."""
    return evaluate(z_v, z_t, img_product, mesh=mesh, axis_names=axis_names,
                    block_rows=block_rows, tile_cols=tile_cols).full_ranks


def full_protocol(z_v, z_t, img_product, *, mesh: Mesh | None = None,
                  axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
                  tile_cols: int | None = None) -> dict[str, float]:
    """``retrieval.full_protocol`` of the device similarity matrix: same keys and numbers,
    including ``i2t_tied`` / ``t2i_tied``."""
    return evaluate(z_v, z_t, img_product, mesh=mesh, axis_names=axis_names,
                    block_rows=block_rows, tile_cols=tile_cols).full


def sample100_protocol(z_v, z_t, cands: Mapping[str, Any], *, img_product=None,
                       mesh: Mesh | None = None, axis_names: Sequence[str] = ("data",),
                       block_rows: int | None = None,
                       tile_cols: int | None = None) -> dict[str, float]:
    """``retrieval.sample100_protocol`` of the device similarity matrix (keys plus
    ``i2t_tied`` / ``t2i_tied``). The candidate scores are gathered from the matrix's tiles, so
    they are the very values the full protocol ranks; this costs one pass over the matrix
    (:func:`evaluate` shares that pass with the full protocol and other candidate sets).
    ``img_product`` only fixes the row layout (rows sorted by product, as in :func:`evaluate`);
    without it the rows keep their order."""
    z_v = _as_f32(z_v, "z_v")
    if img_product is None:
        img_product = np.zeros(len(z_v), np.int64)
    res = evaluate(z_v, z_t, img_product, {"s": cands}, full=False, mesh=mesh,
                   axis_names=axis_names, block_rows=block_rows, tile_cols=tile_cols)
    return res.sample100["s"]


def rank_rows(z_rows, z_cols, row_pos, *, mesh: Mesh | None = None,
              axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
              tile_cols: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the 0-based position of column ``row_pos[i]`` in ``np.argsort(S[i])[::-1]``:
    the strict-greater count, or the literal argsort position where it depends on ties / NaN.
    Returns ``(ranks, tied)``. (The TGIR protocol; the I2T half of the full protocol.)"""
    z_rows, z_cols = _as_f32(z_rows, "z_rows"), _as_f32(z_cols, "z_cols")
    row_pos = _check_row_pos(row_pos, len(z_rows), len(z_cols), "row_pos")
    ops = _operands(z_rows, z_cols, row_pos, mesh, axis_names, block_rows, tile_cols)
    ranks, _ = _ranks(ops, row_pos, cols=False)
    return ranks.i2t, ranks.i2t_tied


def similarity_matrix(z_rows, z_cols, row_pos=None, *, mesh: Mesh | None = None,
                      axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
                      tile_cols: int | None = None) -> np.ndarray:
    """The whole matrix the protocols rank, materialised on the host (tests, small sizes).

    Pass the same ``row_pos`` (``img_product`` / TGIR targets), mesh and block sizes as to the
    protocol to get its exact layout.
    """
    z_rows, z_cols = _as_f32(z_rows, "z_rows"), _as_f32(z_cols, "z_cols")
    if row_pos is not None:
        row_pos = _check_row_pos(row_pos, len(z_rows), len(z_cols), "row_pos")
    ops = _operands(z_rows, z_cols, row_pos, mesh, axis_names, block_rows, tile_cols)
    lay = ops.lay
    out = np.asarray(_tiles_program(lay.mesh, lay.axes)(ops.zr, ops.zc))
    out = out.transpose(0, 2, 1, 3).reshape(lay.n_blocks * lay.bi, lay.n_tiles * lay.bt)
    sim = np.empty((lay.n_rows, lay.n_cols), np.float32)
    sim[lay.order] = out[:lay.n_rows, :lay.n_cols]
    return sim


def topk_device(z_query, z_gallery, k: int, mesh: Mesh | None = None, *,
                axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
                tile_cols: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best gallery items by ``z_query @ z_gallery.T``, computed blockwise.

    Returns ``(scores (n_q, k) float32, indices (n_q, k) int64)`` in contrastive order: score
    descending, equal scores by lower gallery index first; NaN scores rank last (as -inf). The
    tiles are those of the protocols with the queries as rows, so for I2T (queries = images) the
    scores are the full protocol's; with the texts as queries the matrix is the transposed
    product, which can differ from the protocol's in the last bit.
    """
    z_query, z_gallery = _as_f32(z_query, "z_query"), _as_f32(z_gallery, "z_gallery")
    k = int(k)
    if not 1 <= k <= len(z_gallery):
        raise ValueError(f"k must be in [1, {len(z_gallery)}], got {k}")
    # The first tile seeds the running top-k, so it must hold at least k columns.
    tile_cols = max(DEFAULT_TILE_COLS if tile_cols is None else int(tile_cols), k)
    ops = _operands(z_query, z_gallery, None, mesh, axis_names, block_rows, tile_cols)
    lay = ops.lay
    gvalid = _valid_masks(lay)[1]
    v, i = _topk_program(lay.mesh, lay.axes, k)(ops.zr, ops.zc, _put_all(lay, gvalid))
    v = np.asarray(v).reshape(-1, k)[:lay.n_rows]
    i = np.asarray(i).reshape(-1, k)[:lay.n_rows].astype(np.int64)
    return v, i


# ----------------------------------------------------------------------------------------------
# every FashionGen protocol, flat


def fashiongen_protocols(z_v, z_t, img_product, img_subcategory: Sequence[Hashable],
                         product_ids: Sequence[int] | None, *,
                         candidates_path: str | os.PathLike | None = None,
                         clean_candidates_path: str | os.PathLike | None = None,
                         seed: int = R.REFERENCE_SEED, n_draws: int = R.N_DRAWS,
                         n_queries: int = 1000, n_neg: int = R.REFERENCE_NEGATIVES,
                         clean_n_neg: int | None = None, mesh: Mesh | None = None,
                         axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
                         tile_cols: int | None = None) -> dict[str, float]:
    """Full protocol and every sample-100 variant, in percent, from one pass on the devices.

    Keys (``<k>`` = the ``retrieval`` keys of that protocol):

    * ``full/<k>``: all images x all texts (§7.1), with ``i2t_tied`` / ``t2i_tied``.
    * ``sample100/<k>``: the reference draw (seed ``seed`` = 66), saved at ``candidates_path``
      and reused while it matches the split and settings (``retrieval.load_or_draw_candidates``).
    * ``sample100_mean/<k>``, ``sample100_std/<k>``: mean and sample standard deviation
      (``ddof=1``) of the recalls and ``sum`` over ``n_draws`` draws with seeds ``seed``,
      ``seed + 1``, ... (the first is the saved draw); ``sample100_mean/n_draws`` gives the count.
    * ``sample100_clean/<k>``: the cleaned variant (own product never a negative, ``clean_n_neg``
      = ``n_neg - 1`` = 99 negatives + the positive; §10 B6), seed ``seed``, saved beside the
      reference sets (``retrieval.clean_candidates_file``) unless ``clean_candidates_path``.

    ``product_ids[p]`` is the FashionGen product id of product ``p`` (needed to reproduce the
    reference's draw); ``img_subcategory[i]`` the subcategory of image ``i``.
    """
    img_product = np.asarray(img_product, dtype=np.int64).reshape(-1)
    ref = R.load_or_draw_candidates(candidates_path, img_product, img_subcategory, product_ids,
                                    seed=seed, n_queries=n_queries, n_neg=n_neg)
    draws = R.sample100_draws(img_product, img_subcategory, product_ids,
                              seeds=range(seed + 1, seed + max(1, n_draws)),
                              n_queries=n_queries, n_neg=n_neg)
    if clean_candidates_path is None and candidates_path is not None:
        clean_candidates_path = R.clean_candidates_file(candidates_path)
    clean = R.load_or_draw_candidates(clean_candidates_path, img_product, img_subcategory,
                                      product_ids, seed=seed, n_queries=n_queries,
                                      n_neg=n_neg - 1 if clean_n_neg is None else clean_n_neg,
                                      clean=True)
    sets = {"sample100": ref, "sample100_clean": clean}
    sets.update({f"draw{seed + 1 + j}": d for j, d in enumerate(draws)})
    res = evaluate(z_v, z_t, img_product, sets, mesh=mesh, axis_names=axis_names,
                   block_rows=block_rows, tile_cols=tile_cols)
    out = {f"full/{k}": v for k, v in res.full.items()}
    out.update({f"sample100/{k}": v for k, v in res.sample100["sample100"].items()})
    if n_draws >= 1:
        runs = [res.sample100["sample100"]] + [res.sample100[f"draw{seed + 1 + j}"]
                                               for j in range(len(draws))]
        mean, std = R.mean_std(runs[:n_draws])
        out.update({f"sample100_mean/{k}": v for k, v in mean.items()})
        out.update({f"sample100_std/{k}": v for k, v in std.items()})
        out["sample100_mean/n_draws"] = n_draws
    out.update({f"sample100_clean/{k}": v for k, v in res.sample100["sample100_clean"].items()})
    return out

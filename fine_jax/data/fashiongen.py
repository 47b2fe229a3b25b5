"""FashionGen HDF5 files: a lazy, picklable row source and a writer for the same schema.

The layout is the public release's (``fashiongen_256_256_{train,validation}.h5``): one row per
image, the rows of one product contiguous, every text field a ``(N, 1)`` fixed-length bytes array
decoded as latin-1. The embedded synthetic set is written with :func:`write_fashiongen_h5`, so one
reader serves both.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from fine_jax.data.image import CorruptImage

IMAGE_FIELD = "input_image"

# Text fields that the pipeline reads: output key -> HDF5 dataset.
TEXT_FIELDS: dict[str, str] = {
    "description": "input_description",
    "category": "input_category",
    "subcategory": "input_subcategory",
    "composition": "input_composition",
    "gender": "input_gender",
    "name": "input_name",
    "season": "input_season",
}
# Present in the release but unused by the method; written so that our files match its schema.
EXTRA_TEXT_FIELDS: dict[str, str] = {
    "brand": "input_brand",
    "concat_description": "input_concat_description",
    "department": "input_department",
    "pose": "input_pose",
}
REQUIRED_FIELDS: tuple[str, ...] = (
    IMAGE_FIELD, *TEXT_FIELDS.values(), "input_productID", "index", "index_2",
)

ENCODING = "latin-1"


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(ENCODING)
    if isinstance(value, np.bytes_):
        return bytes(value).decode(ENCODING)
    return str(value)


def _column(ds: h5py.Dataset) -> np.ndarray:
    """Reads an ``(N, 1)`` (or ``(N,)``) dataset as a flat ``(N,)`` array."""
    arr = ds[()]
    return arr.reshape(arr.shape[0]) if arr.ndim == 2 else arr


def product_runs(product_ids: Sequence[int]) -> list[tuple[int, list[int]]]:
    """``[(product_id, [rows])]`` from runs of consecutive equal ids, in order of first appearance.

    This is ``prepare_dataset.py``'s ``productid_list.json``; the list position is the product
    (text) index of the evaluation protocols. A product id that comes back after another product
    starts a new run, as in the reference.
    """
    ids = np.asarray(product_ids).reshape(-1)
    if ids.size == 0:
        return []
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    ends = np.concatenate([starts[1:], [ids.size]])
    return [(int(ids[s]), list(range(int(s), int(e)))) for s, e in zip(starts, ends)]


def product_index_arrays(productid_list: Sequence[tuple[int, Sequence[int]]],
                         num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(product index of every row, first row of every product) from ``productid_list``."""
    product_index = np.full((num_rows,), -1, dtype=np.int64)
    first_rows = np.empty((len(productid_list),), dtype=np.int64)
    for p, (_, rows) in enumerate(productid_list):
        product_index[np.asarray(rows, dtype=np.int64)] = p
        first_rows[p] = rows[0]
    return product_index, first_rows


class FashionGenH5Source:
    """Random access to the rows of one FashionGen ``.h5`` file.

    The HDF5 handle is opened on first access in each process and is not pickled, so the source
    can be handed to grain worker processes; a handle inherited through ``fork`` is never reused
    (HDF5 handles are not fork-safe). The per-product index is computed once from
    ``input_productID`` alone, without touching the images.

    ``text_in_memory``: keep the decoded text columns in memory (per process, loaded on first
    access) instead of reading 7 small HDF5 fields per row, which costs more than the image read.
    The default does so for files of at most 100,000 rows (the release's validation split, any
    synthetic set) and reads per row for the 260k-row training file.
    """

    def __init__(self, path: str | os.PathLike, text_in_memory: bool | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"FashionGen HDF5 file not found: {self.path}. Expected the FashionGen release file "
                "(fashiongen_256_256_train.h5 or fashiongen_256_256_validation.h5) or a synthetic "
                "file written by fine_jax.data.synthetic.ensure_dataset at this path."
            )
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._cache: dict[str, Any] = {}
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"{self.path} is not a readable HDF5 file: {e}") from e
        with f:
            missing = [k for k in REQUIRED_FIELDS if k not in f]
            if missing:
                raise ValueError(
                    f"{self.path} is not in the FashionGen HDF5 schema: missing field(s) "
                    f"{', '.join(missing)} (required: {', '.join(REQUIRED_FIELDS)})"
                )
            n = f[IMAGE_FIELD].shape[0]
            img_shape = f[IMAGE_FIELD].shape
            if len(img_shape) != 4 or img_shape[-1] != 3:
                raise ValueError(f"{self.path}: {IMAGE_FIELD} has shape {img_shape}, expected (N, H, W, 3)")
            for k in REQUIRED_FIELDS:
                if f[k].shape[0] != n:
                    raise ValueError(f"{self.path}: field {k} has {f[k].shape[0]} rows, {IMAGE_FIELD} has {n}")
            product_ids = _column(f["input_productID"]).astype(np.int64)
        self._num_rows = int(n)
        self.text_in_memory = bool(n <= 100_000) if text_in_memory is None else bool(text_in_memory)
        self.image_shape: tuple[int, int, int] = tuple(int(x) for x in img_shape[1:])
        self.row_product_id = product_ids
        self.productid_list = product_runs(product_ids)
        self.row_product_index, self._first_rows = product_index_arrays(self.productid_list, n)

    # -- process-local handle -------------------------------------------------------------------

    def _h5(self) -> h5py.File:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            # After fork the parent's handle must not be closed or used from the child.
            self._file = h5py.File(self.path, "r")
            self._pid = pid
            self._datasets = {}
            self._cache = {}
        return self._file

    def _dataset(self, field: str) -> h5py.Dataset:
        f = self._h5()
        ds = self._datasets.get(field)
        if ds is None:  # h5py's name lookup costs as much as a small read; do it once
            ds = self._datasets[field] = f[field]
        return ds

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None
        self._datasets = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        state["_datasets"] = {}
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"FashionGenH5Source({self.path!r}, rows={len(self)}, products={self.num_products})"

    # -- rows -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._num_rows

    @property
    def num_products(self) -> int:
        return len(self.productid_list)

    def _row(self, i: Any) -> int:
        try:
            r = int(i)
        except TypeError as e:
            raise TypeError(f"row index must be an integer, got {type(i).__name__}") from e
        if r < 0:
            r += self._num_rows
        if not 0 <= r < self._num_rows:
            raise IndexError(f"row {i} out of range for {self._num_rows} rows in {self.path}")
        return r

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self._row(i)
        item: dict[str, Any] = {"image": self._image(r)}
        for key, field in TEXT_FIELDS.items():
            if self.text_in_memory:
                item[key] = self._text_column(field)[r]
            else:
                ds = self._dataset(field)
                item[key] = _decode(ds[r, 0] if ds.ndim == 2 else ds[r])
        item["product_id"] = int(self.row_product_id[r])
        item["product_index"] = int(self.row_product_index[r])
        item["row"] = r
        return item

    def _image(self, r: int) -> np.ndarray:
        """One image row; an unreadable chunk (a damaged file) is a CorruptImage for that row only."""
        try:
            return np.asarray(self._dataset(IMAGE_FIELD)[r], dtype=np.uint8)
        except (OSError, ValueError, RuntimeError) as e:
            raise CorruptImage(f"{self.path}: {IMAGE_FIELD} row {r} cannot be read: {e}") from e

    def product_first_rows(self) -> np.ndarray:
        """Row of each product's first image, in product-index order (the evaluation text rows)."""
        return self._first_rows.copy()

    # -- small metadata, no images --------------------------------------------------------------

    def _text_column(self, field: str) -> list[str]:
        key = "text:" + field
        self._h5()  # drops a cache inherited through fork along with the handle
        if key not in self._cache:
            if field not in self._file:
                raise KeyError(f"{self.path} has no field {field}")
            ds = self._dataset(field)
            out: list[str] = []
            # in slices: the release's description column is a wide fixed-length array
            for start in range(0, ds.shape[0], 16384):
                block = ds[start:start + 16384]
                out += [_decode(v) for v in block.reshape(block.shape[0])]
            self._cache[key] = out
        return self._cache[key]

    @property
    def row_subcategory(self) -> list[str]:
        return self._text_column(TEXT_FIELDS["subcategory"])

    @property
    def row_category(self) -> list[str]:
        return self._text_column(TEXT_FIELDS["category"])

    def metadata(self) -> dict[str, Any]:
        """Every small per-row field (no images): text fields as lists of str, ids as arrays.

        Keys: ``row``, ``product_id``, ``product_index`` and the keys of ``TEXT_FIELDS``; also
        ``index`` and ``index_2`` and any of the unused release fields present in the file.
        """
        f = self._h5()
        out: dict[str, Any] = {
            "row": np.arange(self._num_rows, dtype=np.int64),
            "product_id": self.row_product_id.copy(),
            "product_index": self.row_product_index.copy(),
        }
        for key, field in TEXT_FIELDS.items():
            out[key] = list(self._text_column(field))
        for key, field in EXTRA_TEXT_FIELDS.items():
            if field in f:
                out[key] = list(self._text_column(field))
        for key in ("index", "index_2"):
            out[key] = _column(f[key]).astype(np.int64)
        if "input_msrpUSD" in f:
            out["msrp_usd"] = _column(f["input_msrpUSD"]).astype(np.float32)
        return out


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


def _bytes_column(values: Iterable[str], field: str) -> np.ndarray:
    encoded = []
    for v in values:
        try:
            encoded.append(str(v).encode(ENCODING))
        except UnicodeEncodeError as e:
            raise ValueError(f"{field}: {v!r} cannot be stored as latin-1") from e
    width = max(1, max((len(b) for b in encoded), default=1))
    return np.array(encoded, dtype=f"S{width}").reshape(-1, 1)


def write_fashiongen_h5(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], image_size: int,
                        compression: str | None = "gzip") -> None:
    """Writes ``rows`` to ``path`` in the FashionGen release schema, atomically.

    Each row holds ``image`` (image_size x image_size x 3 uint8), the ``TEXT_FIELDS`` keys and
    ``product_id``; optional keys are ``EXTRA_TEXT_FIELDS`` (default ""), ``msrp_usd`` (0.0),
    ``index`` (the row number) and ``index_2`` (the row number). Rows of a product must be
    contiguous. The file is written beside ``path`` under a temporary name and renamed into place,
    so a reader never sees a half-written file.

    Images are stored one chunk per row; ``compression="gzip"`` (level 1) makes flat synthetic
    drawings about 8x smaller for ~40 us more per row read, ``None`` stores them raw like the
    release. No timestamps are stored, so equal rows give a byte-identical file.
    """
    path = os.fspath(path)
    n = len(rows)
    if n == 0:
        raise ValueError("write_fashiongen_h5: no rows to write")
    shape = (image_size, image_size, 3)
    images = np.empty((n, *shape), dtype=np.uint8)
    for r, row in enumerate(rows):
        img = np.asarray(row["image"])
        if img.shape != shape or img.dtype != np.uint8:
            raise ValueError(f"row {r}: image has shape {img.shape} dtype {img.dtype}, expected {shape} uint8")
        images[r] = img
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", track_order=False) as f:
            image_opts = {"compression": "gzip", "compression_opts": 1} if compression == "gzip" else (
                {"compression": compression} if compression else {})
            f.create_dataset(IMAGE_FIELD, data=images, chunks=(1, *shape), track_times=False, **image_opts)
            columns: dict[str, np.ndarray] = {}
            for key, field in {**TEXT_FIELDS, **EXTRA_TEXT_FIELDS}.items():
                default = "" if key in EXTRA_TEXT_FIELDS else None
                values = [row[key] if default is None else row.get(key, default) for row in rows]
                columns[field] = _bytes_column(values, field)
            columns["input_productID"] = np.array([int(row["product_id"]) for row in rows],
                                                  dtype=np.int32).reshape(-1, 1)
            columns["input_msrpUSD"] = np.array([float(row.get("msrp_usd", 0.0)) for row in rows],
                                                dtype=np.float32).reshape(-1, 1)
            for key in ("index", "index_2"):
                columns[key] = np.array([int(row.get(key, r)) for r, row in enumerate(rows)],
                                        dtype=np.int64).reshape(-1, 1)
            for field, data in columns.items():
                f.create_dataset(field, data=data, track_times=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

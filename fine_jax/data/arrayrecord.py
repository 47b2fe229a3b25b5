"""FashionGen as a tensorflow-datasets dataset in ArrayRecord format, written and read without
TensorFlow.

Layout (what ``tfds.builder_from_directory`` / ``tfds.data_source`` expect)::

    <output>/fashiongen/1.0.0/dataset_info.json, features.json
    <output>/fashiongen/1.0.0/fashiongen-<split>.array_record-0000k-of-0000n
    <output>/fashiongen/1.0.0/fine_jax_index-<split>.json.gz

Each record is one image row of the release with every field (``image`` plus the text fields, ids
and the product index), serialised by tfds' own ``FeaturesDict``, so
``tfds.data_source("fashiongen", data_dir=<output>, split="validation")`` reads it as well as
:class:`FashionGenArrayRecordSource` does. ArrayRecord files have random access per record, so
every host reads only its own rows from shared storage.

The index file holds what a loader needs before it touches a record: the products
(``productid_list``: product id and rows, in order of first appearance, which is the product index
of the evaluation protocols), the products of each category and subcategory, and the small per-row
text columns (for evaluation texts and the sample-100 candidate sets).

Images are stored raw (``image_encoding="raw"``: the release's uint8 pixels, nothing to decode) or
as PNG (``"png"``: lossless, smaller files, decoded on read with PIL). Both give identical pixels.
"""
from __future__ import annotations

import concurrent.futures
import gc
import gzip
import io
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from fine_jax.data.fashiongen import EXTRA_TEXT_FIELDS, TEXT_FIELDS, product_index_arrays
from fine_jax.data.image import CorruptImage

DATASET_NAME = "fashiongen"
VERSION = "1.0.0"
INDEX_FILE = "fine_jax_index-{split}.json.gz"
INDEX_FORMAT = "fine_jax_fashiongen_index/1"
IMAGE_ENCODINGS = ("raw", "png")
NUMBER_FIELDS = ("product_id", "product_index", "row", "index", "index_2")
# Per-row number columns of the index, with the dtype metadata() gives them.
NUMBER_COLUMNS = {"index": np.int64, "index_2": np.int64, "msrp_usd": np.float32}

DESCRIPTION = ("FashionGen (256x256 release) in the layout of fine_jax: one record per image row "
               "with all text fields and the product index; written by fine_jax.data.prepare.")


# Held while tensorflow_datasets is first imported and while a process opens a split.
_OPEN_LOCK = threading.RLock()


def _new_lock_after_fork() -> None:  # a forked child must not inherit a lock another thread held
    global _OPEN_LOCK
    _OPEN_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def _tfds():
    """tensorflow_datasets, imported once per process under a lock, with the garbage collector off.

    Its import runs inside etils' lazy-import context, which replaces the import function of the
    whole process until it ends: a second thread importing it at the same moment can deadlock
    (grain's prefetch threads all read their first record at once), and any other import in that
    window, such as a finaliser the collector runs, fails. The sources therefore import it when
    they are created or unpickled, before a pipeline starts its threads (see
    FashionGenArrayRecordSource)."""
    try:
        with _OPEN_LOCK:
            if "tensorflow_datasets" not in sys.modules:
                collecting = gc.isenabled()
                gc.disable()
                try:
                    import tensorflow_datasets  # noqa: F401
                finally:
                    if collecting:
                        gc.enable()
            import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("the ArrayRecord dataset needs tensorflow-datasets (no TensorFlow): "
                          "pip install tensorflow-datasets") from e
    return tfds


def features(image_shape: Sequence[int], image_encoding: str = "raw"):
    """The tfds FeaturesDict of one record."""
    tfds = _tfds()
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image_encoding must be one of {IMAGE_ENCODINGS}, got {image_encoding!r}")
    shape = tuple(int(x) for x in image_shape)
    # BYTES: the pixels as one bytes value, not an int64 list of 196,608 varints (~30x slower to parse).
    image = (tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
             if image_encoding == "raw" else tfds.features.Image(shape=shape, encoding_format="png"))
    spec = {"image": image}
    spec.update({key: tfds.features.Text() for key in (*TEXT_FIELDS, *EXTRA_TEXT_FIELDS)})
    spec.update({key: tfds.features.Scalar(dtype=np.int64) for key in NUMBER_FIELDS})
    spec["msrp_usd"] = tfds.features.Scalar(dtype=np.float32)
    return tfds.features.FeaturesDict(spec)


def find_dataset_dir(path: str | os.PathLike) -> str | None:
    """The version folder (with ``dataset_info.json``) at or below ``path``, or None."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    base = os.path.join(path, DATASET_NAME)
    if os.path.isdir(base):
        versions = sorted(v for v in os.listdir(base)
                          if os.path.isfile(os.path.join(base, v, "dataset_info.json")))
        if versions:
            return os.path.join(base, versions[-1])
    return None


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _example(record: Mapping[str, Any], meta: Mapping[str, Any], r: int, encoding: str) -> dict:
    image = np.asarray(record["image"], dtype=np.uint8)
    ex: dict[str, Any] = {"image": image if encoding == "raw" else _png(image)}
    ex.update({key: str(record[key]) for key in TEXT_FIELDS})
    ex.update({key: str(meta[key][r]) if key in meta else "" for key in EXTRA_TEXT_FIELDS})
    ex.update(product_id=int(record["product_id"]), product_index=int(record["product_index"]),
              row=int(record["row"]), index=int(meta["index"][r]), index_2=int(meta["index_2"][r]),
              msrp_usd=float(meta["msrp_usd"][r]) if "msrp_usd" in meta else 0.0)
    return ex


def _write_shard(source, rows: Sequence[int], path: str, image_shape, encoding: str) -> int:
    """Writes ``rows`` of ``source`` to one ArrayRecord file; returns the bytes written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    feats = features(image_shape, encoding)
    meta = source.metadata()
    writer = ArrayRecordWriter(path, "group_size:1")  # one record per chunk: cheapest random reads
    nbytes = 0
    try:
        for r in rows:
            record = source[int(r)]
            if tuple(record["image"].shape) != tuple(image_shape):
                raise ValueError(f"{source!r} row {r}: image shape {record['image'].shape}, the "
                                 f"split's first row has {tuple(image_shape)}")
            blob = feats.serialize_example(_example(record, meta, int(r), encoding))
            writer.write(blob)
            nbytes += len(blob)
    finally:
        writer.close()
    return nbytes


def _index(source) -> dict[str, Any]:
    meta = source.metadata()
    categories: dict[str, list[int]] = {}
    subcategories: dict[str, list[int]] = {}
    for p, (_, rows) in enumerate(source.productid_list):
        for table, key in ((categories, "category"), (subcategories, "subcategory")):
            for value in dict.fromkeys(meta[key][r] for r in rows):
                table.setdefault(value, []).append(p)
    columns = {key: list(meta[key]) for key in (*TEXT_FIELDS, *EXTRA_TEXT_FIELDS) if key in meta}
    columns.update({key: np.asarray(meta[key]).tolist() for key in NUMBER_COLUMNS if key in meta})
    return {"format": INDEX_FORMAT, "num_rows": len(source),
            "productid_list": [[int(pid), [int(r) for r in rows]] for pid, rows in source.productid_list],
            "categories": categories, "subcategories": subcategories, "columns": columns}


def write_dataset(sources: Mapping[str, Any], output_dir: str | os.PathLike, image_encoding: str = "raw",
                  rows_per_shard: int = 2048, num_workers: int = 1, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> str:
    """Writes every split of ``sources`` ({split: row source}) as one tfds ArrayRecord dataset.

    Everything goes into a hidden staging folder that is renamed into place at the end, so an
    interrupted run leaves no dataset that a loader would pick up. Returns the version folder.
    """
    tfds = _tfds()
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image_encoding must be one of {IMAGE_ENCODINGS}, got {image_encoding!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    final = os.path.join(os.path.abspath(os.fspath(output_dir)), DATASET_NAME, VERSION)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} exists; pass --overwrite to replace it")
    staging = os.path.join(os.path.dirname(final), f".{VERSION}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        split_infos = []
        image_shape = None
        for split, source in sources.items():
            shape = tuple(source[0]["image"].shape)
            if image_shape is not None and shape != image_shape:
                raise ValueError(f"split {split} has {shape} images, an earlier split {image_shape}")
            image_shape = shape
            split_infos.append(_write_split(tfds, source, split, staging, shape, image_encoding,
                                            rows_per_shard, num_workers, log))
            with gzip.open(os.path.join(staging, INDEX_FILE.format(split=split)), "wt",
                           encoding="utf-8", compresslevel=6) as f:
                json.dump(_index(source), f, ensure_ascii=False)
        template = tfds.core.ShardedFileTemplate(data_dir=staging, dataset_name=DATASET_NAME,
                                                 filetype_suffix="array_record")
        tfds.folder_dataset.write_metadata(
            data_dir=staging, features=features(image_shape, image_encoding), split_infos=split_infos,
            filename_template=template, version=VERSION, check_data=False, description=DESCRIPTION)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_split(tfds, source, split, directory, image_shape, encoding, rows_per_shard, num_workers,
                 log):
    n = len(source)
    num_shards = max(1, -(-n // rows_per_shard))
    template = tfds.core.ShardedFileTemplate(data_dir=directory, dataset_name=DATASET_NAME,
                                             filetype_suffix="array_record", split=split)
    jobs = [(np.arange(k * n // num_shards, (k + 1) * n // num_shards),
             os.fspath(template.sharded_filepath(shard_index=k, num_shards=num_shards)))
            for k in range(num_shards)]
    t0 = time.time()
    if num_workers <= 1:
        sizes = []
        for k, (rows, path) in enumerate(jobs):
            sizes.append(_write_shard(source, rows, path, image_shape, encoding))
            log(f"  {split}: shard {k + 1}/{num_shards} ({rows[-1] + 1}/{n} rows, "
                f"{time.time() - t0:.0f}s)")
    else:
        ctx = multiprocessing.get_context("spawn")  # h5py and the tokenizer are not fork-safe
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_shard, source, rows, path, image_shape, encoding)
                       for rows, path in jobs]
            for k, fut in enumerate(futures):
                fut.result()
                log(f"  {split}: shard {k + 1}/{num_shards} done ({time.time() - t0:.0f}s)")
            sizes = [f.result() for f in futures]
    return tfds.core.SplitInfo(name=split, shard_lengths=[len(rows) for rows, _ in jobs],
                               num_bytes=int(sum(sizes)), filename_template=template)


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def read_index(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"index file not found: {path} (written by fine_jax.data.prepare "
                                "beside the ArrayRecord shards)")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable gzip JSON index: {e}") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found != INDEX_FORMAT:
        raise ValueError(f"{path}: field 'format' is {found!r}, expected {INDEX_FORMAT!r}; re-run "
                         "python -m fine_jax.data.prepare")
    for key in ("num_rows", "productid_list", "categories", "subcategories", "columns"):
        if key not in index:
            raise ValueError(f"{path}: missing field {key!r}")
    return index


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class FashionGenArrayRecordSource:
    """Random access to one split of the ArrayRecord dataset, with the records of the HDF5 source.

    The tfds data source is opened on first access in each process and is not pickled; the index
    (products, per-row product index) travels with the source, the text columns do not (they are
    loaded again on demand by :meth:`metadata`).
    """

    def __init__(self, path: str | os.PathLike, split: str):
        directory = find_dataset_dir(path)
        if directory is None:
            raise FileNotFoundError(
                f"no ArrayRecord FashionGen dataset at {os.fspath(path)}: expected "
                f"{DATASET_NAME}/<version>/dataset_info.json there (python -m fine_jax.data.prepare "
                "writes it)")
        self.path = directory
        self.split = split
        with open(os.path.join(directory, "dataset_info.json"), encoding="utf-8") as f:
            info = json.load(f)
        splits = {s["name"]: s for s in info.get("splits", [])}
        if split not in splits:
            raise KeyError(f"{directory} has no split {split!r} (it has {sorted(splits)})")
        num_records = sum(int(x) for x in splits[split].get("shardLengths", []))
        index = read_index(os.path.join(directory, INDEX_FILE.format(split=split)))
        if index["num_rows"] != num_records:
            raise ValueError(f"{directory}: index of {split} lists {index['num_rows']} rows, the "
                             f"shards hold {num_records}")
        self.productid_list = [(int(pid), list(rows)) for pid, rows in index["productid_list"]]
        self.row_product_id = np.empty((num_records,), dtype=np.int64)
        for pid, rows in self.productid_list:
            self.row_product_id[rows] = pid
        self.row_product_index, self._first_rows = product_index_arrays(self.productid_list, num_records)
        self.categories: dict[str, list[int]] = index["categories"]
        self.subcategories: dict[str, list[int]] = index["subcategories"]
        self._columns: dict[str, list] | None = index["columns"]
        self._num_rows = num_records
        self._opened = None  # (process id, tfds data source): opened lazily, once per process
        _tfds()  # here, before any pipeline thread reads (see _tfds)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_opened=None, _columns=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        _tfds()  # a worker process unpickles the source before its prefetch threads read

    def __repr__(self) -> str:
        return (f"FashionGenArrayRecordSource({self.path!r}, {self.split!r}, rows={len(self)}, "
                f"products={self.num_products})")

    def __len__(self) -> int:
        return self._num_rows

    @property
    def num_products(self) -> int:
        return len(self.productid_list)

    @property
    def data_source(self):
        """The tfds ``ArrayRecordDataSource`` of this split (opened once per process)."""
        opened = self._opened
        if opened is None or opened[0] != os.getpid():
            with _OPEN_LOCK:  # one thread opens it; the others wait and use it
                opened = self._opened
                if opened is None or opened[0] != os.getpid():
                    ds = _tfds().builder_from_directory(self.path).as_data_source(self.split)
                    opened = self._opened = (os.getpid(), ds)
        return opened[1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(i)
        if not 0 <= r < self._num_rows:
            raise IndexError(f"row {i} out of range for {self._num_rows} rows in {self.path}")
        try:
            ex = self.data_source[r]
        except Exception as e:  # a damaged shard fails only the records stored in it
            raise CorruptImage(f"{self.path} ({self.split}) record {r} cannot be read: "
                               f"{type(e).__name__}: {e}") from e
        item: dict[str, Any] = {"image": np.asarray(ex["image"], dtype=np.uint8)}
        item.update({key: _text(ex[key]) for key in TEXT_FIELDS})
        item.update(product_id=int(ex["product_id"]), product_index=int(ex["product_index"]), row=r)
        return item

    def product_first_rows(self) -> np.ndarray:
        return self._first_rows.copy()

    def _load_columns(self) -> dict[str, list]:
        if self._columns is None:  # dropped when pickled: workers read text from the records
            path = os.path.join(self.path, INDEX_FILE.format(split=self.split))
            self._columns = read_index(path)["columns"]
        return self._columns

    def _column(self, key: str) -> list:
        return self._load_columns()[key]

    @property
    def row_subcategory(self) -> list[str]:
        return self._column("subcategory")

    @property
    def row_category(self) -> list[str]:
        return self._column("category")

    def metadata(self) -> dict[str, Any]:
        """Same keys as :meth:`FashionGenH5Source.metadata`, from the index (no record is read)."""
        columns = self._load_columns()
        out: dict[str, Any] = {
            "row": np.arange(self._num_rows, dtype=np.int64),
            "product_id": self.row_product_id.copy(),
            "product_index": self.row_product_index.copy(),
        }
        for key, values in columns.items():
            out[key] = (np.asarray(values, dtype=NUMBER_COLUMNS[key]) if key in NUMBER_COLUMNS
                        else list(values))
        return out

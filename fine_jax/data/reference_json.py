"""FashionGen in the reference repositories' own layout (method_spec §6.2).

The reference's ``prepare_dataset.py`` turns each release ``.h5`` file into two JSON files, and the
BLIP variant keeps captions and image lists in ``annotation/``::

    <root>/<split>/info_data.json          one dict per h5 row: every h5 field but the image
    <root>/<split>/productid_list.json     [[product_id, [rows]], ...], runs of equal product ids
    <root>/annotation/fashiongen_{train,val}.json   [{"caption": str, "image": [png names]}, ...]
    <root>/images/<png name>               one 256x256 RGB image per h5 row

``<split>`` is ``train`` or ``validation``; the annotation file of the validation split is
``fashiongen_val.json`` (``fashiongen_test.json`` is byte-identical and accepted too). The
annotation captions are not used for text: in the shipped files they are the bytes repr of the
description (:func:`annotation_caption`), so records take their text from ``info_data.json``.
:class:`FashionGenJsonSource` serves the same records as
:class:`~fine_jax.data.fashiongen.FashionGenH5Source` on the h5 file these were made from: text and
ids from ``info_data.json``, the product index from ``productid_list.json``, and the k-th image of
product p from the k-th name of the p-th annotation entry.

:func:`h5_info_data` and :func:`h5_productid_list` are the reference's two prepare functions;
:func:`write_reference_layout` writes the whole layout from an h5 file.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fine_jax.data import files
from fine_jax.data import image as image_ops
from fine_jax.data.fashiongen import (EXTRA_TEXT_FIELDS, IMAGE_FIELD, TEXT_FIELDS, FashionGenH5Source,
                                      product_index_arrays, product_runs)

INFO_FILE = "info_data.json"
PRODUCTS_FILE = "productid_list.json"
ANNOTATION_DIR = "annotation"
IMAGES_DIR = "images"
# Annotation file stems per split, in order of preference.
ANNOTATION_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("fashiongen_train",),
    "validation": ("fashiongen_val", "fashiongen_test"),
}
# info_data.json keys the records need (besides TEXT_FIELDS' values).
PRODUCT_ID_KEY = "input_productID"


class LayoutError(ValueError):
    """A file of the reference layout is malformed; the message names the file and the field."""


def read_json(path: str | os.PathLike, what: str) -> Any:
    """json.load with errors that name the file and say what it should be."""
    return files.read_json(path, what, LayoutError)


# ----------------------------------------------------------------------------------------------
# The reference prepare step (prepare_dataset.py), from an h5 file
# ----------------------------------------------------------------------------------------------


def _to_python(value: Any) -> Any:
    """prepare_dataset.py's ``numpy_to_python``: bytes decoded as latin-1, numbers as Python."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("latin-1")
    return np.asarray(value).item()


def h5_info_data(h5_path: str | os.PathLike) -> list[dict[str, Any]]:
    """``extract_fashiongen_json``: one dict per row with every field but ``input_image``.

    Keys follow h5py's (sorted) order with ``index_2`` last, as in the reference's output.
    """
    import h5py

    with h5py.File(h5_path, "r") as f:
        keys = [k for k in f.keys() if k not in ("index_2", IMAGE_FIELD)]
        columns = {k: f[k][()] for k in keys + ["index_2"]}
    n = len(columns["index_2"])
    out = []
    for i in range(n):
        row = {k: _to_python(columns[k][i][0]) for k in keys}
        row["index_2"] = _to_python(columns["index_2"][i])
        out.append(row)
    return out


def h5_productid_list(h5_path: str | os.PathLike) -> list[list]:
    """``extract_productid``: ``[[product_id, [rows]], ...]`` over runs of equal product ids."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        ids = np.asarray(f[PRODUCT_ID_KEY][()]).reshape(-1)
    return [[pid, rows] for pid, rows in product_runs(ids)]


def annotation_caption(description: str) -> str:
    """The caption of the plain annotation files: the Python repr of the description's latin-1
    bytes without ``b'...'`` (so "é" reads ``\\xe9`` and quotes are escaped), as in the shipped
    ``fashiongen_val.json``. The ``_symbol`` files hold the description itself."""
    return repr(description.encode("latin-1"))[2:-1]


def symbol_word(category: str, category_symbols: dict[str, str]) -> str:
    """The plain symbol word of the ``_symbol`` captions: ``[coats_sign]`` -> ``coats_sign``."""
    return category_symbols[category.lower()].strip("[]")


def annotation_entries(info: Sequence[dict], productid_list: Sequence[Sequence],
                       category_symbols: dict[str, str] | None = None) -> list[dict]:
    """The BLIP annotation list: per product, its first row's caption and its image names; with
    ``category_symbols``, the ``_symbol`` variant (caption prefixed by the symbol word)."""
    out = []
    for pid, rows in productid_list:
        first = info[rows[0]]
        caption = (annotation_caption(first["input_description"]) if category_symbols is None else
                   symbol_word(first["input_category"], category_symbols) + " " +
                   first["input_description"])
        out.append({"caption": caption, "image": [f"{pid}_{k}.png" for k in range(len(rows))]})
    return out


def write_reference_layout(h5_path: str | os.PathLike, root: str | os.PathLike, split: str,
                           images_dir: str = IMAGES_DIR,
                           category_symbols: dict[str, str] | None = None) -> None:
    """Writes ``<root>/<split>/{info_data,productid_list}.json``, the annotation file and the
    PNG images of ``h5_path`` (a FashionGen release file or one in its schema); with
    ``category_symbols`` also the ``_symbol`` annotation file."""
    if split not in ANNOTATION_NAMES:
        raise ValueError(f"split must be one of {sorted(ANNOTATION_NAMES)}, got {split!r}")
    root = os.fspath(root)
    info = h5_info_data(h5_path)
    products = h5_productid_list(h5_path)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    with open(os.path.join(root, split, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=2)
    with open(os.path.join(root, split, PRODUCTS_FILE), "w", encoding="utf-8") as f:
        json.dump(products, f, ensure_ascii=False)
    entries = annotation_entries(info, products)
    os.makedirs(os.path.join(root, ANNOTATION_DIR), exist_ok=True)
    annotations = {"": entries}
    if category_symbols is not None:
        annotations["_symbol"] = annotation_entries(info, products, category_symbols)
    for suffix, content in annotations.items():
        with open(os.path.join(root, ANNOTATION_DIR, ANNOTATION_NAMES[split][0] + suffix + ".json"),
                  "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=1)
    os.makedirs(os.path.join(root, images_dir), exist_ok=True)
    source = FashionGenH5Source(h5_path)
    for entry, (_, rows) in zip(entries, products):
        for name, r in zip(entry["image"], rows):
            Image.fromarray(source[r]["image"]).save(os.path.join(root, images_dir, name))
    source.close()


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def _check_info(info: Any, path: str) -> None:
    if not isinstance(info, list) or not info:
        raise LayoutError(f"{path}: expected a non-empty list with one object per image row")
    required = [PRODUCT_ID_KEY, *TEXT_FIELDS.values()]
    for i, row in enumerate(info):
        if not isinstance(row, dict):
            raise LayoutError(f"{path}: entry {i} is a {type(row).__name__}, expected an object")
        for key in required:
            if key not in row:
                raise LayoutError(f"{path}: entry {i} has no field {key!r} (required: {required})")
            expected = int if key == PRODUCT_ID_KEY else str
            if not isinstance(row[key], expected) or isinstance(row[key], bool):
                raise LayoutError(f"{path}: entry {i} field {key!r} is {row[key]!r}, expected "
                                  f"{'an integer' if expected is int else 'a string'}")


def _check_products(products: Any, path: str, row_ids: Sequence[int], info_path: str) -> None:
    if not isinstance(products, list) or not products:
        raise LayoutError(f"{path}: expected a non-empty list of [product_id, [rows]]")
    seen = np.zeros(len(row_ids), dtype=bool)
    for p, entry in enumerate(products):
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], int)
                or not isinstance(entry[1], list) or not entry[1]):
            raise LayoutError(f"{path}: entry {p} is {entry!r:.80}, expected [product_id, [rows]]")
        for r in entry[1]:
            if not isinstance(r, int) or not 0 <= r < len(row_ids):
                raise LayoutError(f"{path}: entry {p} lists row {r!r}, but {info_path} has "
                                  f"{len(row_ids)} rows")
            if seen[r]:
                raise LayoutError(f"{path}: row {r} is listed twice")
            if row_ids[r] != entry[0]:
                raise LayoutError(f"{path}: entry {p} (product {entry[0]}) lists row {r}, whose "
                                  f"input_productID in {info_path} is {row_ids[r]}")
            seen[r] = True
    if not seen.all():
        raise LayoutError(f"{path}: rows {np.flatnonzero(~seen)[:5].tolist()} of {info_path} "
                          "belong to no product")


def _check_annotation(entries: Any, path: str, products: Sequence[Sequence]) -> None:
    if not isinstance(entries, list):
        raise LayoutError(f"{path}: expected a list of {{'caption': str, 'image': [names]}}")
    if len(entries) != len(products):
        raise LayoutError(f"{path} has {len(entries)} entries but {PRODUCTS_FILE} has "
                          f"{len(products)} products; they must list the same products in order")
    for p, (entry, (pid, rows)) in enumerate(zip(entries, products)):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), list):
            raise LayoutError(f"{path}: entry {p} has no field 'image' (a list of file names)")
        if not isinstance(entry.get("caption"), str):
            raise LayoutError(f"{path}: entry {p} has no field 'caption' (a string)")
        if len(entry["image"]) != len(rows):
            raise LayoutError(f"{path}: entry {p} lists {len(entry['image'])} images but product "
                              f"{pid} has {len(rows)} rows in {PRODUCTS_FILE}")


def find_annotation(root: str | os.PathLike, split: str) -> str:
    for stem in ANNOTATION_NAMES[split]:
        path = os.path.join(os.fspath(root), ANNOTATION_DIR, stem + ".json")
        if os.path.isfile(path):
            return path
    names = " or ".join(f"{ANNOTATION_DIR}/{s}.json" for s in ANNOTATION_NAMES[split])
    raise FileNotFoundError(f"annotation file not found in {root}: expected {names}")


class FashionGenJsonSource:
    """Random access to the rows of one split in the reference layout (see the module docstring).

    All text is held in memory (equal strings shared), so the source pickles to grain workers with
    everything it needs; images are read from their PNG files on access. A missing or undecodable
    image raises :class:`~fine_jax.data.image.CorruptImage` for that row only.
    """

    def __init__(self, root: str | os.PathLike, split: str, images_dir: str = IMAGES_DIR):
        if split not in ANNOTATION_NAMES:
            raise ValueError(f"split must be one of {sorted(ANNOTATION_NAMES)}, got {split!r}")
        self.root = os.path.abspath(os.fspath(root))
        self.split = split
        self.path = os.path.join(self.root, split)
        info_path = os.path.join(self.path, INFO_FILE)
        products_path = os.path.join(self.path, PRODUCTS_FILE)
        info = read_json(info_path, "info_data.json of the reference prepare step")
        _check_info(info, info_path)
        row_ids = [row[PRODUCT_ID_KEY] for row in info]
        products = read_json(products_path, "productid_list.json of the reference prepare step")
        _check_products(products, products_path, row_ids, info_path)
        annotation_path = find_annotation(self.root, split)
        entries = read_json(annotation_path, "annotation file")
        _check_annotation(entries, annotation_path, products)
        self.images_dir = os.path.join(self.root, images_dir)
        if not os.path.isdir(self.images_dir):
            raise FileNotFoundError(f"image folder not found: {self.images_dir} (the PNG files "
                                    f"named in {annotation_path})")

        n = len(info)
        self.productid_list = [(int(pid), list(rows)) for pid, rows in products]
        self.row_product_id = np.asarray(row_ids, dtype=np.int64)
        self.row_product_index, self._first_rows = product_index_arrays(self.productid_list, n)
        interned: dict[str, str] = {}
        self._text = {key: [interned.setdefault(row[field], row[field]) for row in info]
                      for key, field in TEXT_FIELDS.items()}
        self._extra = {key: [str(row.get(field, "")) for row in info]
                       for key, field in EXTRA_TEXT_FIELDS.items() if field in info[0]}
        self._numbers = {key: np.asarray([row.get(key, i) for i, row in enumerate(info)], np.int64)
                         for key in ("index", "index_2")}
        if "input_msrpUSD" in info[0]:
            self._numbers["msrp_usd"] = np.asarray([row.get("input_msrpUSD", 0.0) for row in info],
                                                   np.float32)
        self._image_names = [""] * n
        for entry, (_, rows) in zip(entries, self.productid_list):
            for name, r in zip(entry["image"], rows):
                self._image_names[r] = name

    def __len__(self) -> int:
        return len(self._image_names)

    def __repr__(self) -> str:
        return (f"FashionGenJsonSource({self.root!r}, {self.split!r}, rows={len(self)}, "
                f"products={self.num_products})")

    @property
    def num_products(self) -> int:
        return len(self.productid_list)

    def image_path(self, row: int) -> str:
        return os.path.join(self.images_dir, self._image_names[row])

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(i)
        if not 0 <= r < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows in {self.path}")
        item: dict[str, Any] = {"image": image_ops.load_image_file(self.image_path(r))}
        for key in TEXT_FIELDS:
            item[key] = self._text[key][r]
        item["product_id"] = int(self.row_product_id[r])
        item["product_index"] = int(self.row_product_index[r])
        item["row"] = r
        return item

    def product_first_rows(self) -> np.ndarray:
        return self._first_rows.copy()

    @property
    def row_subcategory(self) -> list[str]:
        return self._text["subcategory"]

    @property
    def row_category(self) -> list[str]:
        return self._text["category"]

    def metadata(self) -> dict[str, Any]:
        """Same keys as :meth:`FashionGenH5Source.metadata` (the fields ``info_data.json`` holds)."""
        out: dict[str, Any] = {
            "row": np.arange(len(self), dtype=np.int64),
            "product_id": self.row_product_id.copy(),
            "product_index": self.row_product_index.copy(),
        }
        out.update({k: list(v) for k, v in self._text.items()})
        out.update({k: list(v) for k, v in self._extra.items()})
        out.update({k: v.copy() for k, v in self._numbers.items()})
        return out

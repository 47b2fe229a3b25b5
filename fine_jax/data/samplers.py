"""What one item is, per stage (method_spec §3.3, §6.3, §7), over any FashionGen row source.

* Stage 1: one item per image row; its ``idx`` is the product index (position of the product in
  ``productid_list.json`` order), so all images of a product are ITC positives of each other.
* Stage 2: one item per product; each time the item is fetched, one of the product's image rows is
  drawn uniformly from the item's generator (a new draw every epoch, since grain seeds each record
  by its position in the stream).
* Evaluation: one text per product, from the description of its first row; every image row; the
  product index of each image and the subcategory of each image row, for the sample-100 sets.

A row source is any of :class:`~fine_jax.data.fashiongen.FashionGenH5Source`,
:class:`~fine_jax.data.reference_json.FashionGenJsonSource` and
:class:`~fine_jax.data.arrayrecord.FashionGenArrayRecordSource`: ``len``, ``source[row]``,
``productid_list``, ``row_product_index``, ``product_first_rows()`` and ``metadata()``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class ProductRows:
    """Random-access list of products: item ``p`` is ``(p, rows of product p)``. Picklable."""

    def __init__(self, source):
        self._rows = [np.asarray(rows, dtype=np.int64) for _, rows in source.productid_list]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, p: int) -> tuple[int, np.ndarray]:
        return int(p), self._rows[int(p)]


def draw_row(rows: np.ndarray, rng: np.random.Generator) -> int:
    """Stage 2: one image row of a product, uniformly (the reference's ``random.choice``)."""
    return int(rows[int(rng.integers(len(rows)))])


@dataclasses.dataclass
class EvalSet:
    """The evaluation split as the protocols of method_spec §7 see it."""

    descriptions: list[str]  # per product, from its first row
    first_rows: np.ndarray  # per product
    product_ids: list[int]  # per product, productid_list.json order
    image_product: np.ndarray  # per image row: its product index
    image_subcategory: list[str]  # per image row
    subcategory_products: dict[str, list[int]]  # product indexes per subcategory, first appearance

    @property
    def num_texts(self) -> int:
        return len(self.descriptions)

    @property
    def num_images(self) -> int:
        return len(self.image_product)


def eval_set(source) -> EvalSet:
    meta: dict[str, Any] = source.metadata()
    first_rows = np.asarray(source.product_first_rows(), dtype=np.int64)
    subcategory_products: dict[str, dict[int, None]] = {}
    image_product = np.asarray(source.row_product_index, dtype=np.int64)
    for sub, p in zip(meta["subcategory"], image_product.tolist()):
        subcategory_products.setdefault(sub, {})[p] = None
    return EvalSet(
        descriptions=[meta["description"][r] for r in first_rows.tolist()],
        first_rows=first_rows,
        product_ids=[int(pid) for pid, _ in source.productid_list],
        image_product=image_product,
        image_subcategory=list(meta["subcategory"]),
        subcategory_products={k: list(v) for k, v in subcategory_products.items()},
    )


"""FashionIQ for text-guided image retrieval (stage 3; method_spec §5.3, §6.6, §7.4).

The public FashionIQ layout::

    <root>/captions/cap.{dress,shirt,toptee}.{train,val}.json
        [{"target": asin, "candidate": asin, "captions": [c1, c2]}, ...]
    <root>/image_splits/split.{dress,shirt,toptee}.{train,val}.json     [asin, ...]
    <root>/<images>/<asin>.png     (``tgir_images`` in Fashion-FINE, ``images`` in the release)

Training uses the three categories merged (the reference's hand-made ``cap.train.json``: used when
present, else built by concatenating dress, shirt, toptee in that order), one item per triplet.
Validation is per category (and "all"), with the query text and reference image of each triplet
and two galleries:

* ``"val"``: the union of the candidate and target images of that category's val triplets, the
  reference's gallery (in order of first appearance; the reference's order is a Python set's).
* ``"split"``: the category's full image split ``image_splits/split.{cat}.val.json``.

The reference image stays in the gallery. Text (both uses): pre_caption("the difference between
two images are " + " and ".join(captions)), then [CLS] + word-pieces, truncated to 79, no [SEP].
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from fine_jax.data import files
from fine_jax.data import image as image_ops
from fine_jax.data import text as text_ops

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val")
GALLERIES = ("val", "split")
IMAGE_DIRS = ("tgir_images", "images")
TGIR_PROMPT = "the difference between two images are "
MAX_LEN = 79


class FashionIQError(ValueError):
    """A malformed FashionIQ file; the message names the file, the entry and the field."""


def tgir_text(captions: Sequence[str]) -> str:
    """The normalised query text of one triplet (the reference's ``' and '.join(captions)``)."""
    return text_ops.pre_caption(TGIR_PROMPT + " and ".join(captions))


def encode_tgir_text(captions: Sequence[str], tokenizer: text_ops.Tokenizer,
                     max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] + word-pieces of :func:`tgir_text`, truncated to ``max_len``, zero-padded, no [SEP]."""
    ids = [tokenizer.cls_id] + tokenizer.wordpiece_ids(tgir_text(captions))
    ids = ids[:max_len]
    out = np.zeros((max_len,), dtype=np.int32)  # the reference pads with a literal 0
    mask = np.zeros((max_len,), dtype=np.int32)
    out[:len(ids)] = ids
    mask[:len(ids)] = 1
    return out, mask


def _load_json(path: str) -> Any:
    return files.read_json(path, "FashionIQ file", FashionIQError)


def load_captions(path: str) -> list[dict[str, Any]]:
    """One ``cap.*.json`` file, checked entry by entry."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise FashionIQError(f"{path}: expected a list of {{target, candidate, captions}} objects")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise FashionIQError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object")
        for key in ("target", "candidate"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise FashionIQError(f"{path}: entry {i} has no field {key!r} (an image id string)")
        caps = entry.get("captions")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise FashionIQError(f"{path}: entry {i} field 'captions' must be a non-empty list of "
                                 f"strings, got {caps!r:.80}")
    return data


def load_image_split(path: str) -> list[str]:
    data = _load_json(path)
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
        raise FashionIQError(f"{path}: expected a list of image id strings")
    return data


@dataclasses.dataclass
class Triplet:
    candidate: str
    target: str
    captions: list[str]
    category: str


class FashionIQ:
    """The files of one FashionIQ folder; see the module docstring."""

    def __init__(self, root: str | os.PathLike, image_dir: str | None = None):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"FashionIQ folder not found: {self.root}. Expected captions/cap.{{dress,shirt,"
                "toptee}.{train,val}.json, image_splits/split.{dress,shirt,toptee}.{train,val}.json "
                f"and the images as <asin>.png in {' or '.join(IMAGE_DIRS)}/")
        candidates = [image_dir] if image_dir else list(IMAGE_DIRS)
        found = [d for d in candidates if os.path.isdir(os.path.join(self.root, d))]
        if not found:
            raise FileNotFoundError(f"FashionIQ image folder not found in {self.root}: expected "
                                    f"{' or '.join(candidates)}/ with <asin>.png files")
        self.image_dir = os.path.join(self.root, found[0])

    def captions_path(self, category: str, split: str) -> str:
        return os.path.join(self.root, "captions", f"cap.{category}.{split}.json")

    def triplets(self, category: str, split: str) -> list[Triplet]:
        """``category`` is one of CATEGORIES or "all" (the merged file when present)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if category == "all":
            merged = os.path.join(self.root, "captions", f"cap.{split}.json")
            if os.path.isfile(merged):
                return [Triplet(e["candidate"], e["target"], list(e["captions"]), "all")
                        for e in load_captions(merged)]
            return [t for c in CATEGORIES for t in self.triplets(c, split)]
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES} or 'all', got {category!r}")
        return [Triplet(e["candidate"], e["target"], list(e["captions"]), category)
                for e in load_captions(self.captions_path(category, split))]

    def image_path(self, asin: str) -> str:
        return os.path.join(self.image_dir, asin + ".png")

    def load_image(self, asin: str) -> np.ndarray:
        return image_ops.load_image_file(self.image_path(asin))

    def train_set(self) -> "TripletSource":
        return TripletSource(self, self.triplets("all", "train"))

    def val_set(self, category: str, gallery: str = "val") -> "TGIRValSet":
        return tgir_val_set(self, category, gallery)


class TripletSource:
    """Random access to training triplets with their two images (picklable for grain workers).

    Image ids are numbered in order of first appearance over (candidate, target) of each triplet.
    A missing or undecodable image raises :class:`~fine_jax.data.image.CorruptImage`.
    """

    def __init__(self, fiq: FashionIQ, triplets: Sequence[Triplet]):
        self.fiq = fiq
        self.triplets = list(triplets)
        ids: dict[str, int] = {}
        for t in self.triplets:
            ids.setdefault(t.candidate, len(ids))
            ids.setdefault(t.target, len(ids))
        self.image_ids = ids

    def __len__(self) -> int:
        return len(self.triplets)

    def __repr__(self) -> str:
        return f"TripletSource({self.fiq.root!r}, triplets={len(self)}, images={len(self.image_ids)})"

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.triplets[int(i)]
        return {"reference_image": self.fiq.load_image(t.candidate),
                "target_image": self.fiq.load_image(t.target), "captions": t.captions,
                "reference_id": self.image_ids[t.candidate], "target_id": self.image_ids[t.target],
                "index": int(i)}


@dataclasses.dataclass
class TGIRValSet:
    """Queries and gallery of one validation category.

    ``labels[i] = (i, reference gallery index, target gallery index)`` as in the reference's
    ``get_labels``; ``gallery`` holds image ids (load with ``FashionIQ.load_image``).
    """

    category: str
    gallery_kind: str
    texts: list[str]  # normalised query texts
    captions: list[list[str]]
    gallery: list[str]
    labels: np.ndarray  # (num_queries, 3) int64


def tgir_val_set(fiq: FashionIQ, category: str, gallery: str = "val") -> TGIRValSet:
    if gallery not in GALLERIES:
        raise ValueError(f"gallery must be one of {GALLERIES}, got {gallery!r}")
    triplets = fiq.triplets(category, "val")
    if gallery == "val":
        images = list(dict.fromkeys(a for t in triplets for a in (t.candidate, t.target)))
    else:
        cats = CATEGORIES if category == "all" else (category,)
        paths = [os.path.join(fiq.root, "image_splits", f"split.{c}.val.json") for c in cats]
        images = list(dict.fromkeys(a for p in paths for a in load_image_split(p)))
    where = {a: k for k, a in enumerate(images)}
    labels = []
    for i, t in enumerate(triplets):
        for asin in (t.candidate, t.target):
            if asin not in where:
                raise FashionIQError(f"image {asin} of val triplet {i} ({t.category}) is not in the "
                                     f"{gallery!r} gallery of {category}")
        labels.append((i, where[t.candidate], where[t.target]))
    return TGIRValSet(category=category, gallery_kind=gallery,
                      texts=[tgir_text(t.captions) for t in triplets],
                      captions=[t.captions for t in triplets], gallery=images,
                      labels=np.asarray(labels, dtype=np.int64).reshape(-1, 3))

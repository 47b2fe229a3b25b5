"""A FashionIQ-layout set for text-guided image retrieval (stage 3), drawn from the synthetic catalogue.

Each triplet is a reference product, a target made from it by one or two edits (colour, pattern,
adding or removing one local detail) and two FashionIQ-style relative captions naming the edits
("is red", "has a chest pocket"). Targets come in *families*: three to five targets edited from
one reference, and two families share one (subcategory, colour, pattern), so a validation
gallery holds many near-duplicates of every reference and the text must be read to rank the
target first. Each product is drawn with its own view jitter, as two photographs would differ.

The folder is the public FashionIQ layout that :class:`fine_jax.data.fashioniq.FashionIQ` reads::

    captions/cap.{dress,shirt,toptee}.{train,val}.json
    image_splits/split.{dress,shirt,toptee}.{train,val}.json
    images/<asin>.png
    vocab.txt             WordPiece vocab covering every query text whole
    tgir_products.json    the products' attributes and each triplet's edits
    manifest.json

FashionIQ's categories map to the catalogue's: dress <- DRESSES, shirt <- SHIRTS, toptee <-
T-SHIRTS, TANK TOPS and SWEATERS. Train and val products are disjoint (no image is in both), and
the val references' (subcategory, colour, pattern) never occur as a train reference's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from fine_jax.data.fashioniq import CATEGORIES, TGIR_PROMPT, tgir_text
from fine_jax.data.synthetic.captions import count_unknown, vocab_texts
from fine_jax.data.synthetic.catalogue import (BRANDS, COLOURS, PATTERNS, SEASONS, SUBCATEGORY_BY_NAME, Product,
                                               Subcategory, compatible_details, ordered_details, sample_details)
from fine_jax.data.synthetic.rendering import DEFAULT_IMAGE_SIZE, render
from fine_jax.data.synthetic.storage import (MANIFEST_FILE, VOCAB_FILE, Damaged, count_lines, ensure_cached,
                                             read_checked_json, write_json, write_vocab)

GENERATOR = "fine_jax.data.synthetic.tgir"
GENERATOR_VERSION = 1

DEFAULT_NUM_TRAIN = 1600
DEFAULT_NUM_VALIDATION = 300

SPLITS = ("train", "val")
IMAGE_DIR = "images"
CAPTIONS_FILE = "captions/cap.{category}.{split}.json"
IMAGE_SPLIT_FILE = "image_splits/split.{category}.{split}.json"
PRODUCTS_FILE = "tgir_products.json"
TGIR_FILES = frozenset({"captions", "image_splits", IMAGE_DIR, VOCAB_FILE, PRODUCTS_FILE, MANIFEST_FILE})

# FashionIQ category -> the catalogue subcategories whose products it holds.
FASHIONIQ_SUBCATEGORIES: dict[str, tuple[str, ...]] = {
    "dress": ("SHORT DRESSES", "LONG DRESSES"),
    "shirt": ("SHIRTS", "SHORT SLEEVE SHIRTS"),
    "toptee": ("T-SHIRTS", "TANK TOPS", "CREWNECKS", "HOODIES & ZIPUPS"),
}

EDIT_KINDS = ("colour", "pattern", "add", "remove")
FAMILY_SIZES = (3, 4, 5)  # targets edited from one reference
_MAX_DETAILS = 4

# detail -> (noun phrase, bare noun): "has a chest pocket" / "has no chest pocket".
DETAIL_PHRASES: dict[str, tuple[str, str]] = {
    "chest pocket": ("a chest pocket", "chest pocket"),
    "logo patch": ("a logo patch", "logo patch"),
    "collar": ("a contrast collar", "collar"),
    "button placket": ("buttons down the front", "buttons"),
    "cuffs": ("contrast cuffs", "cuffs"),
    "zip": ("a zip", "zip"),
    "belt": ("a belt", "belt"),
    "trim": ("contrast trim", "trim"),
    "drawstring": ("a drawstring", "drawstring"),
}


def _pattern_phrases(pattern: str, second: str) -> list[str]:
    return {
        "solid": ["is solid", "is plain", "has no pattern", "is a solid color"],
        "stripes": ["is striped", f"has {second} stripes", "has stripes"],
        "checks": ["is checked", f"has a {second} check pattern", "has checks"],
        "dots": ["has polka dots", f"has {second} polka dots", "is polka dot"],
        "colorblock": ["is colorblocked", f"has a {second} panel at the bottom", "has a colorblock panel"],
    }[pattern]


def edit_phrases(edit: Mapping[str, str], target: Product) -> list[str]:
    """The relative captions that can describe one edit, each naming what the edit changes to."""
    kind = edit["kind"]
    if kind == "colour":
        c = edit["to"]
        return [f"is {c}", f"is {c} in color", f"same {target.spec.noun} in {c}", f"is {c} instead of {edit['from']}",
                f"has a {c} color"]
    if kind == "pattern":
        return _pattern_phrases(edit["to"], target.second_colour)
    phrase, bare = DETAIL_PHRASES[edit["detail"]]
    if kind == "add":
        return [f"has {phrase}", f"with {phrase}", f"adds {phrase}"]
    if kind == "remove":
        return [f"has no {bare}", f"without {phrase}", f"no {bare}"]
    raise ValueError(f"unknown edit kind {kind!r}")


def apply_edits(product: Product, edits: Sequence[Mapping[str, str]]) -> Product:
    """``product`` with ``edits`` applied (its id and view jitter unchanged)."""
    colour, pattern, details = product.colour, product.pattern, set(product.details)
    for e in edits:
        if e["kind"] == "colour":
            colour = e["to"]
        elif e["kind"] == "pattern":
            pattern = e["to"]
        elif e["kind"] == "add":
            details.add(e["detail"])
        elif e["kind"] == "remove":
            details.discard(e["detail"])
        else:
            raise ValueError(f"unknown edit kind {e['kind']!r}")
    return dataclasses.replace(product, colour=colour, pattern=pattern,
                               details=ordered_details(product.spec, details))


def _draw_edit(rng: np.random.Generator, kind: str, ref: Product, others: Sequence[Mapping[str, str]]
               ) -> dict[str, str] | None:
    sub = ref.spec
    if kind == "colour":
        options = [c for c in COLOURS if c != ref.colour]
        return {"kind": "colour", "from": ref.colour, "to": options[int(rng.integers(len(options)))]}
    if kind == "pattern":
        options = [p for p in PATTERNS if p != ref.pattern]
        return {"kind": "pattern", "from": ref.pattern, "to": options[int(rng.integers(len(options)))]}
    if kind == "add":  # a detail the reference lacks; drawn after a removal, not the removed one
        kept = set(ref.details) - {e["detail"] for e in others if e["kind"] == "remove"}
        options = [d for d in sub.details if d not in ref.details and len(kept) < _MAX_DETAILS
                   and compatible_details(sub, kept | {d})]
    else:  # one of the reference's own details, so never one an "add" edit just put on
        options = list(ref.details)
    if not options:
        return None
    return {"kind": kind, "detail": options[int(rng.integers(len(options)))]}


def _draw_target_edits(rng: np.random.Generator, ref: Product) -> list[dict[str, str]]:
    n = 1 if rng.random() < 0.6 else 2
    edits: list[dict[str, str]] = []
    for i in rng.permutation(len(EDIT_KINDS)):
        if len(edits) == n:
            break
        e = _draw_edit(rng, EDIT_KINDS[int(i)], ref, edits)
        if e is not None:
            edits.append(e)
    return edits


def _captions(rng: np.random.Generator, edits: Sequence[Mapping[str, str]], target: Product) -> list[str]:
    """Two captions as two annotators would write them: both about the one edit, in different
    words, or one about each of two edits."""
    if len(edits) == 1:
        phrases = edit_phrases(edits[0], target)
        i, j = rng.choice(len(phrases), size=2, replace=False)
        return [phrases[int(i)], phrases[int(j)]]
    out = []
    for e in edits:
        phrases = edit_phrases(e, target)
        out.append(phrases[int(rng.integers(len(phrases)))])
    return out


def _split_counts(n: int) -> dict[str, int]:
    return {c: n // len(CATEGORIES) + (k < n % len(CATEGORIES)) for k, c in enumerate(CATEGORIES)}


def _reference_bases(rng: np.random.Generator, category: str, val_share: float) -> dict[str, list[tuple]]:
    """Disjoint (subcategory, colour, pattern) combinations for the references of each split."""
    bases = [(s, c, p) for s in FASHIONIQ_SUBCATEGORIES[category] for c in COLOURS for p in PATTERNS]
    perm = [bases[int(i)] for i in rng.permutation(len(bases))]
    n_val = min(max(int(round(len(bases) * val_share)), 1), len(bases) - 1)
    return {"val": perm[:n_val], "train": perm[n_val:]}


def make_triplets(seed: int, num_train: int = DEFAULT_NUM_TRAIN, num_validation: int = DEFAULT_NUM_VALIDATION
                  ) -> tuple[list[Product], list[dict[str, Any]]]:
    """The products (train first) and the triplets: dicts with ``split``, ``category``,
    ``candidate`` and ``target`` (product ids), ``edits`` and ``captions``, in file order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    counts = {"train": _split_counts(num_train), "val": _split_counts(num_validation)}
    bases = {c: _reference_bases(rng, c, num_validation / (num_train + num_validation)) for c in CATEGORIES}
    products: list[Product] = []
    triplets: list[dict[str, Any]] = []
    seen: set = set()

    def add(p: Product) -> Product:
        p = dataclasses.replace(p, product_id=len(products), group=len(products))  # group: own view jitter
        products.append(p)
        seen.add(p.signature)
        return p

    for split in SPLITS:
        for category in CATEGORIES:
            rows: list[dict[str, Any]] = []
            family = 0
            while len(rows) < counts[split][category]:
                size = min(int(rng.choice(FAMILY_SIZES)), counts[split][category] - len(rows))
                base_list = bases[category][split]
                sub_name, colour, pattern = base_list[(family // 2) % len(base_list)]
                sub: Subcategory = SUBCATEGORY_BY_NAME[sub_name]
                for _ in range(100):
                    details = sample_details(rng, sub)
                    if (sub.subcategory, colour, pattern, frozenset(details)) not in seen:
                        break
                else:
                    raise RuntimeError(f"could not draw a new {split} {category} reference; the requested size "
                                       "exceeds what the attribute space holds")
                ref = add(Product(
                    product_id=-1, group=-1, split=split, subcategory=sub.subcategory, colour=colour,
                    pattern=pattern, details=details,
                    fabric=sub.fabrics[int(rng.integers(len(sub.fabrics)))],
                    gender=sub.gender or ("MEN", "WOMEN")[int(rng.integers(2))],
                    season=SEASONS[int(rng.integers(len(SEASONS)))], brand=BRANDS[int(rng.integers(len(BRANDS)))],
                    msrp_usd=float(rng.integers(8, 120) * 10 - 5)))
                for _ in range(size):
                    for _ in range(100):
                        edits = _draw_target_edits(rng, ref)
                        target = apply_edits(ref, edits)
                        if target.signature not in seen:
                            break
                    else:
                        raise RuntimeError(f"could not draw a new target for a {split} {category} reference")
                    target = add(target)
                    rows.append({"split": split, "category": category, "candidate": ref.product_id,
                                 "target": target.product_id, "edits": edits,
                                 "captions": _captions(rng, edits, target)})
                family += 1
            triplets += [rows[int(i)] for i in rng.permutation(len(rows))]  # families apart in the file
    return products, triplets


def asin(product_id: int) -> str:
    return f"SYN{product_id:07d}"


def _sizes(num_train: int, num_validation: int, image_size: int) -> dict[str, int]:
    # at least one triplet per category
    for name, v, lo in (("num_train", num_train, len(CATEGORIES)), ("num_validation", num_validation, len(CATEGORIES)),
                        ("image_size", image_size, 16)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return {"num_train": int(num_train), "num_validation": int(num_validation), "image_size": int(image_size)}


def query_texts(triplets: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each triplet's query as the model reads it, raw and normalised."""
    texts = []
    for t in triplets:
        texts += [TGIR_PROMPT + " and ".join(t["captions"]), tgir_text(t["captions"])]
    return texts


def generate_tgir_dataset(out_dir: str | os.PathLike, seed: int = 0, *, num_train: int = DEFAULT_NUM_TRAIN,
                          num_validation: int = DEFAULT_NUM_VALIDATION, image_size: int = DEFAULT_IMAGE_SIZE,
                          base_vocab: str | os.PathLike | None = None) -> dict[str, Any]:
    """Writes the whole TGIR set into ``out_dir`` (not atomically; see :func:`ensure_tgir_dataset`).

    Returns the manifest, which is written last. Same arguments, byte-identical files.
    """
    sizes = _sizes(num_train, num_validation, image_size)
    out = pathlib.Path(out_dir)
    products, triplets = make_triplets(seed, sizes["num_train"], sizes["num_validation"])
    category_of = {t[k]: t["category"] for t in triplets for k in ("candidate", "target")}
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    image_bytes = 0
    for p in products:
        path = out / IMAGE_DIR / f"{asin(p.product_id)}.png"
        Image.fromarray(render(p, 0, image_size, seed)).save(path, format="PNG")
        image_bytes += path.stat().st_size
    (out / "captions").mkdir(exist_ok=True)
    (out / "image_splits").mkdir(exist_ok=True)
    counts: dict[str, Any] = {s: {} for s in SPLITS}
    for split in SPLITS:
        for category in CATEGORIES:
            rows = [t for t in triplets if t["split"] == split and t["category"] == category]
            write_json(out / CAPTIONS_FILE.format(category=category, split=split),
                       [{"target": asin(t["target"]), "candidate": asin(t["candidate"]), "captions": t["captions"]}
                        for t in rows])
            write_json(out / IMAGE_SPLIT_FILE.format(category=category, split=split),
                       [asin(p.product_id) for p in products
                        if p.split == split and category_of[p.product_id] == category])
            counts[split][category] = len(rows)
    write_json(out / PRODUCTS_FILE, {
        "products": [{"asin": asin(p.product_id), "fashioniq_category": category_of[p.product_id], **p.to_json()}
                     for p in products],
        "triplets": [{**t, "candidate": asin(t["candidate"]), "target": asin(t["target"])} for t in triplets],
    })
    texts = query_texts(triplets)
    if base_vocab is None:
        vocab_size = len(write_vocab(out / VOCAB_FILE, vocab_texts(products) + texts))
    else:
        shutil.copyfile(base_vocab, out / VOCAB_FILE)
        vocab_size = count_lines(out / VOCAB_FILE)
        n_unk = count_unknown(out / VOCAB_FILE, texts)
        if n_unk:
            raise ValueError(f"{base_vocab} leaves {n_unk} [UNK] pieces in the TGIR query texts")
    counts.update(images=len(products), image_bytes=image_bytes, vocab_size=vocab_size)
    manifest = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": int(seed), "sizes": sizes,
        "base_vocab": _vocab_digest(base_vocab), "counts": counts,
        "files": {"captions": CAPTIONS_FILE, "image_splits": IMAGE_SPLIT_FILE, "images": f"{IMAGE_DIR}/<asin>.png",
                  "vocab": VOCAB_FILE, "products": PRODUCTS_FILE},
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest


def _vocab_digest(base_vocab: str | os.PathLike | None) -> str | None:
    if base_vocab is None:
        return None
    return hashlib.sha256(pathlib.Path(base_vocab).read_bytes()).hexdigest()


def _check_tgir(root: pathlib.Path, manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with a TGIR set whose manifest matches, or None (file headers and sizes only)."""
    counts = manifest["counts"]
    for split in SPLITS:
        for category in CATEGORIES:
            name = CAPTIONS_FILE.format(category=category, split=split)
            if len(read_checked_json(root / name)) != counts[split][category]:
                return f"{name} does not have {counts[split][category]} triplets"
            read_checked_json(root / IMAGE_SPLIT_FILE.format(category=category, split=split))
    try:
        entries = [e for e in os.scandir(root / IMAGE_DIR) if e.name.endswith(".png")]
    except FileNotFoundError:
        raise Damaged(f"{IMAGE_DIR}/ is missing") from None
    if len(entries) != counts["images"] or sum(e.stat().st_size for e in entries) != counts["image_bytes"]:
        return f"{IMAGE_DIR}/ does not hold the {counts['images']} images it was written with"
    if count_lines(root / VOCAB_FILE) != counts["vocab_size"]:
        return f"{VOCAB_FILE} does not have {counts['vocab_size']} entries"
    read_checked_json(root / PRODUCTS_FILE)
    return None


def ensure_tgir_dataset(root: str | os.PathLike, seed: int = 0, *, num_train: int = DEFAULT_NUM_TRAIN,
                        num_validation: int = DEFAULT_NUM_VALIDATION, image_size: int = DEFAULT_IMAGE_SIZE,
                        base_vocab: str | os.PathLike | None = None) -> pathlib.Path:
    """The synthetic TGIR set in ``root`` (FashionIQ layout), generated on first use; returns ``root``.

    ``num_train`` / ``num_validation`` are triplets, shared out evenly over dress, shirt, toptee.
    ``base_vocab``: a vocab.txt to copy into the folder instead of building one for the TGIR texts,
    e.g. the synthetic FashionGen set's, so that a stage-1 model keeps its word ids; it must
    tokenise the query texts without [UNK] (words it lacks are split into characters).

    Cached like :func:`fine_jax.data.synthetic.ensure_dataset`: reused when the manifest matches
    (seed, sizes, version, base vocab) and the files are whole, else built in a temporary folder
    and renamed into place.
    """
    sizes = _sizes(num_train, num_validation, image_size)
    vocab = None if base_vocab is None else os.path.abspath(os.fspath(base_vocab))
    return ensure_cached(
        root, key={"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": int(seed), "sizes": sizes,
                   "base_vocab": _vocab_digest(vocab)},
        names=TGIR_FILES, check=_check_tgir,
        generate=lambda out: generate_tgir_dataset(out, seed, base_vocab=vocab, **sizes),
        label="the synthetic TGIR set",
        detail=(f"{sizes['num_train']}+{sizes['num_validation']} triplets, {sizes['image_size']} px, seed {seed}"))


def load_tgir_products(root: str | os.PathLike) -> dict[str, Any]:
    """``tgir_products.json``: ``products`` (attributes by asin) and ``triplets`` (with their edits)."""
    with open(pathlib.Path(root) / PRODUCTS_FILE, encoding="utf-8") as f:
        data = json.load(f)
    return {"products": {p["asin"]: p for p in data["products"]}, "triplets": data["triplets"]}

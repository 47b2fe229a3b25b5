"""The synthetic FashionGen set on disk: its files, and a cache folder that is built once.

The images and texts go into FashionGen's own HDF5 schema (:mod:`fine_jax.data.fashiongen`), so
the real and the synthetic data share one loader. :func:`ensure_dataset` builds the set once into
a directory and reuses it afterwards; :func:`ensure_cached` is that cache logic, shared with the
TGIR variant (:mod:`fine_jax.data.synthetic.tgir`).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any, Callable, Collection, Mapping

import h5py

from fine_jax.data.fashiongen import REQUIRED_FIELDS, write_fashiongen_h5
from fine_jax.data.synthetic.captions import LEXICON, build_vocab, count_unknown, vocab_texts
from fine_jax.data.synthetic.catalogue import (CATEGORY_SYMBOLS, DEFAULT_NUM_TRAIN, DEFAULT_NUM_VALIDATION,
                                               make_products)
from fine_jax.data.synthetic.rendering import DEFAULT_IMAGE_SIZE, DEFAULT_VIEWS, render

# Recorded in the manifest; the name predates the package and is kept so existing caches stay valid.
GENERATOR = "fine_jax.data.synthetic"
GENERATOR_VERSION = 1

TRAIN_FILE = "fashiongen_synthetic_train.h5"
VALIDATION_FILE = "fashiongen_synthetic_validation.h5"
SPLIT_FILES = {"train": TRAIN_FILE, "validation": VALIDATION_FILE}
CATEGORY_SIGN_FILE = "categorys_to_sign.txt"
TWINS_FILE = "twins_{split}.json"
LEXICON_FILE = "lexicon.json"
VOCAB_FILE = "vocab.txt"
PRODUCTS_FILE = "products.json"
MANIFEST_FILE = "manifest.json"
DATASET_FILES = frozenset({*SPLIT_FILES.values(), CATEGORY_SIGN_FILE, LEXICON_FILE, VOCAB_FILE, PRODUCTS_FILE,
                           MANIFEST_FILE, *(TWINS_FILE.format(split=s) for s in SPLIT_FILES)})


def _sizes(num_train: int, num_validation: int, views: int, image_size: int) -> dict[str, int]:
    for name, v, lo in (("num_train", num_train, 2), ("num_validation", num_validation, 2), ("views", views, 1),
                        ("image_size", image_size, 16)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return {"num_train": int(num_train), "num_validation": int(num_validation), "views": int(views),
            "image_size": int(image_size)}


def write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def write_vocab(path: pathlib.Path, texts: list[str]) -> list[str]:
    """Builds the vocab of ``texts`` into ``path`` and checks that it tokenises them without [UNK]."""
    vocab = build_vocab(texts)
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    n_unk = count_unknown(path, texts)
    if n_unk:
        raise RuntimeError(f"the generated vocab leaves {n_unk} [UNK] pieces in the dataset's texts")
    return vocab


def generate_dataset(out_dir: str | os.PathLike, seed: int = 0, *, num_train: int = DEFAULT_NUM_TRAIN,
                     num_validation: int = DEFAULT_NUM_VALIDATION, views: int = DEFAULT_VIEWS,
                     image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, Any]:
    """Writes the whole dataset into ``out_dir`` (not atomically; see :func:`ensure_dataset`).

    Returns the manifest, which is written last. Every file is a pure function of the seed and
    sizes: the same arguments give byte-identical files.
    """
    sizes = _sizes(num_train, num_validation, views, image_size)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    products, twins = make_products(seed, num_train, num_validation)
    counts: dict[str, Any] = {}
    for split, fname in SPLIT_FILES.items():
        rows = []
        for p in (q for q in products if q.split == split):
            desc = p.description
            for v in range(views):
                rows.append(dict(
                    image=render(p, v, image_size, seed), description=desc, category=p.category,
                    subcategory=p.subcategory, composition=p.composition, gender=p.gender, name=p.name,
                    season=p.season, brand=p.brand, concat_description=f"{p.name}. {desc}",
                    department=p.spec.department, pose=f"id_gridfs_{v + 1}", product_id=p.product_id,
                    msrp_usd=p.msrp_usd, index=len(rows), index_2=v,
                ))
        write_fashiongen_h5(out / fname, rows, image_size)
        with open(out / TWINS_FILE.format(split=split), "w", encoding="utf-8") as f:  # one pair a line
            f.write("[\n" + ",\n".join(json.dumps(list(t)) for t in twins[split]) + "\n]\n")
        counts[split] = {"products": len(rows) // views, "images": len(rows), "twin_pairs": len(twins[split])}
    with open(out / CATEGORY_SIGN_FILE, "w", encoding="utf-8", newline="\n") as f:
        for cat, sym in CATEGORY_SYMBOLS.items():
            f.write(f"{cat.lower()}\t{sym}\n")
    write_json(out / LEXICON_FILE, LEXICON)
    write_json(out / PRODUCTS_FILE, [p.to_json() for p in products])
    vocab = write_vocab(out / VOCAB_FILE, vocab_texts(products))
    counts.update(categories=len({p.category for p in products}), subcategories=len({p.subcategory for p in products}),
                  vocab_size=len(vocab))
    manifest = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": int(seed), "sizes": sizes, "counts": counts,
        "files": {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "vocab": VOCAB_FILE,
                  "category_signs": CATEGORY_SIGN_FILE, "lexicon": LEXICON_FILE, "products": PRODUCTS_FILE,
                  "twins": {s: TWINS_FILE.format(split=s) for s in SPLIT_FILES}},
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest


def _read_json(path: pathlib.Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Damaged(Exception):
    """A cached dataset's file is missing or unreadable; the message says which and how."""


def read_checked_json(path: pathlib.Path) -> Any:
    try:
        return _read_json(path)
    except FileNotFoundError:
        raise Damaged(f"{path.name} is missing") from None
    except (OSError, ValueError):
        raise Damaged(f"{path.name} is not valid JSON") from None


def count_lines(path: pathlib.Path) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        raise Damaged(f"{path.name} is missing") from None
    except (OSError, ValueError):
        raise Damaged(f"{path.name} is not readable text") from None


def _h5_rows(path: pathlib.Path) -> dict[str, int]:
    try:
        with h5py.File(path, "r") as f:
            return {k: f[k].shape[0] for k in REQUIRED_FIELDS if k in f}
    except FileNotFoundError:
        raise Damaged(f"{path.name} is missing") from None
    except OSError:  # truncated or not HDF5
        raise Damaged(f"{path.name} is not a readable HDF5 file") from None


def _check_dataset(root: pathlib.Path, manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with a dataset whose manifest matches, or None. Reads every file's header or
    text (no image data), so it costs milliseconds: cheap enough for every start of a run."""
    counts = manifest["counts"]
    for split, fname in SPLIT_FILES.items():
        expected = counts[split]["images"]
        rows = _h5_rows(root / fname)
        missing = sorted(set(REQUIRED_FIELDS) - rows.keys())
        if missing:
            return f"{fname} lacks {', '.join(missing)}"
        wrong = sorted(k for k, n in rows.items() if n != expected)
        if wrong:
            return f"{fname} has {rows[wrong[0]]} rows in {wrong[0]}, expected {expected}"
        twins = TWINS_FILE.format(split=split)
        if len(read_checked_json(root / twins)) != counts[split]["twin_pairs"]:
            return f"{twins} does not have {counts[split]['twin_pairs']} pairs"
    if len(read_checked_json(root / PRODUCTS_FILE)) != counts["train"]["products"] + counts["validation"]["products"]:
        return f"{PRODUCTS_FILE} does not list every product"
    if count_lines(root / VOCAB_FILE) != counts["vocab_size"]:
        return f"{VOCAB_FILE} does not have {counts['vocab_size']} entries"
    read_checked_json(root / LEXICON_FILE)
    if count_lines(root / CATEGORY_SIGN_FILE) != len(CATEGORY_SYMBOLS):
        return f"{CATEGORY_SIGN_FILE} does not have {len(CATEGORY_SYMBOLS)} lines"
    return None


def ensure_dataset(root: str | os.PathLike, seed: int = 0, *, num_train: int = DEFAULT_NUM_TRAIN,
                   num_validation: int = DEFAULT_NUM_VALIDATION, views: int = DEFAULT_VIEWS,
                   image_size: int = DEFAULT_IMAGE_SIZE) -> pathlib.Path:
    """The synthetic dataset in ``root``, generated on first use; returns ``root``.

    An existing dataset is reused when its manifest matches the seed, sizes and generator version
    and its files are whole; see :func:`ensure_cached` for how it is (re)built otherwise.
    """
    sizes = _sizes(num_train, num_validation, views, image_size)
    return ensure_cached(
        root, key={"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": int(seed), "sizes": sizes},
        names=DATASET_FILES, check=_check_dataset, generate=lambda out: generate_dataset(out, seed, **sizes),
        label="the synthetic FashionGen set",
        detail=(f"{sizes['num_train']}+{sizes['num_validation']} products x {sizes['views']} views, "
                f"{sizes['image_size']} px, seed {seed}"))


def _read_manifest(root: pathlib.Path) -> dict[str, Any] | None:
    try:
        m = _read_json(root / MANIFEST_FILE)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _matches(manifest: Mapping[str, Any] | None, key: Mapping[str, Any]) -> bool:
    return manifest is not None and all(manifest.get(k) == v for k, v in key.items())


def _cache_state(root: pathlib.Path, key: Mapping[str, Any],
             check: Callable[[pathlib.Path, Mapping[str, Any]], str | None]) -> tuple[bool, str | None]:
    """(whether ``root`` holds the dataset of ``key``, what is wrong with it or None)."""
    manifest = _read_manifest(root)
    if not _matches(manifest, key):
        return False, None
    try:
        return True, check(root, manifest)
    except Damaged as e:
        return True, str(e)
    except (KeyError, TypeError, IndexError, ValueError) as e:  # a manifest without the expected entries
        return True, f"{MANIFEST_FILE} is malformed ({type(e).__name__}: {e})"


def ensure_cached(root: str | os.PathLike, *, key: Mapping[str, Any], names: Collection[str],
                  check: Callable[[pathlib.Path, Mapping[str, Any]], str | None],
                  generate: Callable[[pathlib.Path], Any], label: str, detail: str) -> pathlib.Path:
    """A generated dataset in ``root``, built by ``generate(folder)`` unless already there; returns ``root``.

    ``root`` is reused when its manifest (``manifest.json``) has every entry of ``key`` and
    ``check(root, manifest)`` finds nothing wrong (it returns a short reason otherwise). Else the
    set is generated into a temporary directory beside ``root`` and renamed into place, so
    ``root`` never holds a half-written dataset; when several processes race, one rename wins and
    the others reuse its result. A stale dataset of the same generator, or a damaged one (files
    that ``check`` rejects, or an unreadable manifest among only the files ``names`` lists), is
    replaced, with one line on stdout saying so. A non-empty ``root`` that is neither is left
    alone (ValueError).
    """
    root = pathlib.Path(root)
    ours, problem = _cache_state(root, key, check)
    if ours and problem is None:
        return root
    if not ours and root.exists():
        if not root.is_dir():
            raise ValueError(f"{root} exists and is not a directory")
        present = {p.name for p in root.iterdir()}
        old = _read_manifest(root)
        if old is None and MANIFEST_FILE in present and present <= set(names):
            problem = f"{MANIFEST_FILE} is not a readable manifest"
        elif present and (old is None or old.get("generator") != key["generator"]):
            raise ValueError(f"{root} is not empty and holds no manifest of {label}; "
                             "refusing to overwrite it (choose an empty or new directory)")
    if problem is None:
        print(f"fine_jax: generating {label} in {root} ({detail})", flush=True)
    else:
        print(f"fine_jax: {label} in {root} is damaged ({problem}); regenerating it ({detail})", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the dataset is meant to be shared
        _install(tmp, root, lambda: _cache_state(root, key, check) == (True, None))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _install(tmp: pathlib.Path, root: pathlib.Path, installed: Callable[[], bool]) -> None:
    try:
        os.rename(tmp, root)  # succeeds when root is absent or an empty directory
        return
    except OSError:
        pass
    if installed():
        return  # another process installed the same dataset first
    old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(root, old)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, root)
    except OSError:
        if not installed():
            raise
    finally:
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


def load_twins(root: str | os.PathLike, split: str = "validation") -> list[tuple[int, int, str]]:
    with open(pathlib.Path(root) / TWINS_FILE.format(split=split), encoding="utf-8") as f:
        return [(int(a), int(b), str(w)) for a, b, w in json.load(f)]


def split_path(root: str | os.PathLike, split: str) -> pathlib.Path:
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    return pathlib.Path(root) / SPLIT_FILES[split]

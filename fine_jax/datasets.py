"""Resolve the configured dataset into sources, tokenizer and tables, with clear errors.

``data.source = "synthetic"`` generates (once, cached) the embedded demo set; ``"fashiongen"``
reads FashionGen from ``data.data_dir`` in any of its three forms (``data.format``, ``"auto"``
detects it from the files there):

* ``"arrayrecord"``: the tfds ArrayRecord dataset written by ``python -m fine_jax.data.prepare``;
* ``"h5"``: the release files ``fashiongen_256_256_{train,validation}.h5``;
* ``"reference_json"``: the reference repositories' layout (``{train,validation}/info_data.json``,
  ``productid_list.json``, ``annotation/fashiongen_{train,val}.json`` and ``images/``).

All three give the same records. The vocab and the category table are read from ``data.data_dir``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from fine_jax.data import text as text_ops

SPLITS = ("train", "validation")
FORMATS = ("auto", "arrayrecord", "h5", "reference_json")
LEXICONS = ("wordnet", "json", "none")


class DatasetMissing(RuntimeError):
    """The dataset is not where the config says; the message says what to put where."""


class DatasetInvalid(DatasetMissing):
    """The dataset is there but a file is malformed; the message names the file and the field."""


@dataclasses.dataclass
class ResolvedData:
    train: object | None  # a FashionGen row source (data.fashiongen / reference_json / arrayrecord)
    eval: object | None
    tokenizer: text_ops.Tokenizer
    category_symbols: dict
    lexicon: object  # text.Lexicon or wordnet.WordNetLexicon
    twins: list  # [(product_id_a, product_id_b), ...] in the evaluation split, may be empty
    root: pathlib.Path
    format: str = "h5"


FASHIONGEN_HELP = """\
FashionGen was not found in data.data_dir={root}.
Expected there one of three forms of FashionGen (data.format={fmt!r}):
  (1) fashiongen/1.0.0/dataset_info.json + ArrayRecord shards, written by
        python -m fine_jax.data.prepare --input=DIR_WITH_FASHIONGEN --output={root}
  (2) {train} and {eval}   (the FashionGen 256x256 release, HDF5)
  (3) train/info_data.json, train/productid_list.json, validation/info_data.json,
      validation/productid_list.json, annotation/fashiongen_train.json,
      annotation/fashiongen_val.json and images/   (the reference repositories' layout)
and beside it:
  {vocab}   (the reference BERT vocab with the 9 fashion symbols at ids 1-9,
              fashion_annotation/vocab.txt of the Fashion-FINE / FashionSAP repositories)
  {category}   (FashionSAP fashion_annotation/categorys_to_sign.txt)
The release files come from https://fashion-gen.com (by request). Put them with the two text
files in one folder and pass --config.data.data_dir=/that/folder.
To try fine_jax without FashionGen, run the embedded demo: --config=configs/demo.py"""


def detect_format(root: str | os.PathLike, train_file: str = "fashiongen_256_256_train.h5",
                  eval_file: str = "fashiongen_256_256_validation.h5") -> str | None:
    """The FashionGen form found in ``root`` (prepared ArrayRecord first, it is the fastest)."""
    from fine_jax.data import arrayrecord, reference_json

    root = pathlib.Path(root)
    if arrayrecord.find_dataset_dir(root) is not None:
        return "arrayrecord"
    if (root / train_file).is_file() or (root / eval_file).is_file():
        return "h5"
    if any((root / split / reference_json.INFO_FILE).is_file() for split in SPLITS):
        return "reference_json"
    return None


def open_fashiongen(root: str | os.PathLike, split: str, fmt: str,
                    train_file: str = "fashiongen_256_256_train.h5",
                    eval_file: str = "fashiongen_256_256_validation.h5", images_dir: str = "images"):
    """The row source of one split (``"train"`` or ``"validation"``) in form ``fmt``."""
    from fine_jax.data import arrayrecord, reference_json
    from fine_jax.data.fashiongen import FashionGenH5Source

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = pathlib.Path(root)
    if fmt == "arrayrecord":
        return arrayrecord.FashionGenArrayRecordSource(root, split)
    if fmt == "h5":
        return FashionGenH5Source(root / (train_file if split == "train" else eval_file))
    if fmt == "reference_json":
        return reference_json.FashionGenJsonSource(root, split, images_dir=images_dir)
    raise ValueError(f"data.format={fmt!r} is not known; use one of {FORMATS}")


def make_lexicon(d, root: pathlib.Path):
    """The antonym/synonym lexicon of the stage-1 corruption, per ``data.lexicon``."""
    from fine_jax.data import wordnet

    if d.lexicon == "none":
        return text_ops.Lexicon.empty()
    if d.lexicon == "json":
        if not d.lexicon_file:
            raise DatasetMissing("data.lexicon='json' needs data.lexicon_file (a JSON file with "
                                 "'antonyms' and 'synonyms' tables)")
        return text_ops.Lexicon.from_json(root / d.lexicon_file)
    if d.lexicon == "wordnet":
        try:
            return wordnet.WordNetLexicon(d.wordnet_dir or None)
        except wordnet.WordNetMissing as e:
            raise DatasetMissing(str(e)) from None
    raise DatasetMissing(f"data.lexicon={d.lexicon!r} is not known; use one of {LEXICONS}")


def _resolve_synthetic(cfg, splits) -> ResolvedData:
    from fine_jax.data import synthetic
    from fine_jax.data.fashiongen import FashionGenH5Source

    d = cfg.data
    root = synthetic.ensure_dataset(
        pathlib.Path(d.data_dir).expanduser(), seed=d.synthetic_seed,
        num_train=d.synthetic_train_products, num_validation=d.synthetic_eval_products,
        views=d.synthetic_views, image_size=d.synthetic_image_size)
    with open(root / synthetic.TWINS_FILE.format(split="validation")) as f:
        twins = [(int(a), int(b)) for a, b, *_ in json.load(f)]
    return ResolvedData(
        train=FashionGenH5Source(root / synthetic.TRAIN_FILE) if "train" in splits else None,
        eval=FashionGenH5Source(root / synthetic.VALIDATION_FILE) if "validation" in splits
        else None,
        tokenizer=text_ops.Tokenizer.from_vocab_file(root / synthetic.VOCAB_FILE),
        category_symbols=text_ops.load_category_symbols(root / synthetic.CATEGORY_SIGN_FILE),
        lexicon=text_ops.Lexicon.from_json(root / synthetic.LEXICON_FILE), twins=twins, root=root,
        format="h5")


def resolve(cfg, splits=SPLITS, lexicon: bool = True) -> ResolvedData:
    """FashionGen (or the embedded set) for ``splits``; evaluation passes ``("validation",)`` and
    ``lexicon=False``, so it opens neither the training split nor WordNet."""
    d = cfg.data
    if d.source == "synthetic":
        return _resolve_synthetic(cfg, splits)
    if d.source != "fashiongen":
        raise DatasetMissing(f"data.source={d.source!r} is not known; use 'fashiongen' or 'synthetic'")
    root = pathlib.Path(d.data_dir).expanduser()
    help_text = FASHIONGEN_HELP.format(root=root, fmt=d.format, train=d.train_file, eval=d.eval_file,
                                       vocab=d.vocab_file, category=d.category_file)
    if not root.is_dir():
        raise DatasetMissing(help_text + f"\nMissing: the folder {root} itself does not exist")
    fmt = detect_format(root, d.train_file, d.eval_file) if d.format == "auto" else d.format
    if fmt is None:
        raise DatasetMissing(help_text + f"\nMissing: no FashionGen files in {root}")
    missing = [name for name in (d.vocab_file, d.category_file) if not (root / name).is_file()]
    if missing:
        raise DatasetMissing(help_text + f"\nMissing: {', '.join(missing)}")
    try:
        train, evaluation = (
            open_fashiongen(root, split, fmt, d.train_file, d.eval_file, d.images_dir)
            if split in splits else None for split in SPLITS)
        tokenizer = text_ops.Tokenizer.from_vocab_file(root / d.vocab_file)
        symbols = text_ops.load_category_symbols(root / d.category_file)
    except FileNotFoundError as e:
        raise DatasetMissing(f"{e}\n\n{help_text}") from None
    except (ValueError, KeyError) as e:
        raise DatasetInvalid(f"FashionGen in {root} (format {fmt}): {e}") from None
    return ResolvedData(train=train, eval=evaluation, tokenizer=tokenizer, category_symbols=symbols,
                        lexicon=make_lexicon(d, root) if lexicon else None, twins=[], root=root,
                        format=fmt)


# ----------------------------------------------------------------------------------------------
# FashionIQ (stage 3)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ResolvedFashionIQ:
    fiq: object  # fine_jax.data.fashioniq.FashionIQ
    tokenizer: text_ops.Tokenizer
    root: pathlib.Path


FASHIONIQ_HELP = """FashionIQ was not found in data.data_dir={root}.
Expected there (the public FashionIQ layout):
  captions/cap.{{dress,shirt,toptee}}.{{train,val}}.json
  image_splits/split.{{dress,shirt,toptee}}.{{train,val}}.json
  images/<asin>.png   (or tgir_images/, the reference's folder name)
  {vocab}   (the reference BERT vocab, fashion_annotation/vocab.txt)
and pass --config.data.data_dir=/that/folder. To try stage 3 without FashionIQ, use the embedded
set: --config.data.source=synthetic (configs/demo_tgir.py)."""


def resolve_fashioniq(cfg) -> ResolvedFashionIQ:
    """FashionIQ in ``data.data_dir``, or the embedded set's TGIR variant (``source=synthetic``)."""
    from fine_jax.data import fashioniq

    d = cfg.data
    if d.source == "synthetic":
        from fine_jax.data import synthetic

        # Beside the FashionGen set (not inside it), with its vocab, so that a stage-1 demo model
        # keeps its word ids in stage 3.
        fashiongen = _resolve_synthetic(cfg, splits=())
        base = pathlib.Path(d.data_dir).expanduser()
        root = synthetic.ensure_tgir_dataset(
            base.with_name(base.name + "_tgir"), seed=d.synthetic_seed,
            num_train=d.synthetic_tgir_train, num_validation=d.synthetic_tgir_eval,
            image_size=d.synthetic_image_size, base_vocab=fashiongen.root / synthetic.VOCAB_FILE)
        vocab = root / "vocab.txt"
    else:
        root = pathlib.Path(d.data_dir).expanduser()
        vocab = root / d.vocab_file
    help_text = FASHIONIQ_HELP.format(root=root, vocab=d.vocab_file)
    try:
        fiq = fashioniq.FashionIQ(root)
        if not vocab.is_file():
            raise FileNotFoundError(f"no vocab: {vocab}")
        if not (root / "captions").is_dir():
            raise FileNotFoundError(f"no captions/ folder in {root}")
    except FileNotFoundError as e:
        raise DatasetMissing(f"{help_text}\nMissing: {e}") from None
    return ResolvedFashionIQ(fiq=fiq, tokenizer=text_ops.Tokenizer.from_vocab_file(vocab),
                             root=root)

"""Resolve the configured dataset into sources, tokenizer and tables, with clear errors.

``data.source = "synthetic"`` generates (once, cached) the embedded demo set; ``"fashiongen"``
expects the FashionGen release files and the reference tables in ``data.data_dir``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from fine_jax.data import text as text_ops
from fine_jax.data.fashiongen import FashionGenH5Source


class DatasetMissing(RuntimeError):
    """The dataset is not where the config says; the message says what to put where."""


@dataclasses.dataclass
class ResolvedData:
    train: FashionGenH5Source
    eval: FashionGenH5Source
    tokenizer: text_ops.Tokenizer
    category_symbols: dict
    lexicon: text_ops.Lexicon
    twins: list  # [(product_id_a, product_id_b), ...] in the evaluation split, may be empty
    root: pathlib.Path


FASHIONGEN_HELP = """\
FashionGen was not found in data.data_dir={root}.
Expected there:
  {train}   (FashionGen release, HDF5)
  {eval}   (FashionGen release, HDF5)
  {vocab}   (the reference BERT vocab with the 9 fashion symbols at ids 1-9,
              fashion_annotation/vocab.txt of the Fashion-FINE / FashionSAP repositories)
  {category}   (FashionSAP fashion_annotation/categorys_to_sign.txt)
Download the two .h5 files of the FashionGen 256x256 release (https://fashion-gen.com, by request),
put them with the two text files in one folder, and pass --config.data.data_dir=/that/folder.
To try fine_jax without FashionGen, run the embedded demo: --config=configs/demo.py"""


def _synthetic_root(cfg) -> pathlib.Path:
    return pathlib.Path(cfg.data.data_dir).expanduser()


def resolve(cfg) -> ResolvedData:
    d = cfg.data
    if d.source == "synthetic":
        from fine_jax.data import synthetic

        root = synthetic.ensure_dataset(
            _synthetic_root(cfg), seed=d.synthetic_seed, num_train=d.synthetic_train_products,
            num_validation=d.synthetic_eval_products, views=d.synthetic_views,
            image_size=d.synthetic_image_size)
        with open(root / synthetic.TWINS_FILE.format(split="validation")) as f:
            twins = [(int(a), int(b)) for a, b, *_ in json.load(f)]
        return ResolvedData(
            train=FashionGenH5Source(root / synthetic.TRAIN_FILE),
            eval=FashionGenH5Source(root / synthetic.VALIDATION_FILE),
            tokenizer=text_ops.Tokenizer.from_vocab_file(root / synthetic.VOCAB_FILE),
            category_symbols=text_ops.load_category_symbols(root / synthetic.CATEGORY_SIGN_FILE),
            lexicon=text_ops.Lexicon.from_json(root / synthetic.LEXICON_FILE), twins=twins,
            root=root)
    if d.source != "fashiongen":
        raise DatasetMissing(f"data.source={d.source!r} is not known; use 'fashiongen' or 'synthetic'")
    root = pathlib.Path(d.data_dir).expanduser()
    files = {"train": d.train_file, "eval": d.eval_file, "vocab": d.vocab_file,
             "category": d.category_file}
    missing = [name for name in files.values() if not (root / name).is_file()]
    if missing:
        raise DatasetMissing(FASHIONGEN_HELP.format(root=root, **files) +
                             f"\nMissing: {', '.join(missing)}")
    lexicon = text_ops.Lexicon.from_json(root / d.lexicon_file) if d.lexicon_file else \
        text_ops.Lexicon.empty()
    return ResolvedData(
        train=FashionGenH5Source(root / d.train_file), eval=FashionGenH5Source(root / d.eval_file),
        tokenizer=text_ops.Tokenizer.from_vocab_file(root / d.vocab_file),
        category_symbols=text_ops.load_category_symbols(root / d.category_file),
        lexicon=lexicon, twins=[], root=root)

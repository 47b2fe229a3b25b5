"""Convert FashionGen (release HDF5 files or the reference JSON layout) into the tfds ArrayRecord
dataset that fine_jax reads fastest, on one host or many.

    python -m fine_jax.data.prepare --input=/data/fashiongen_release --output=/data/fashiongen_ar
    python -m fine_jax.data.prepare --input=/data/fashiongen_ref --format=reference_json \\
        --output=/data/fashiongen_ar --image_encoding=png --num_workers=8

The output folder then holds ``fashiongen/1.0.0/`` (dataset_info.json, features.json, the shards of
each split and the product/category index) plus copies of ``vocab.txt`` and
``categorys_to_sign.txt`` when the input has them, so it can be used directly as
``--config.data.data_dir``. It is also a regular tfds dataset:
``tfds.data_source("fashiongen", data_dir=OUTPUT, split="validation")``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from fine_jax import datasets
from fine_jax.data import arrayrecord

TABLES = ("vocab.txt", "categorys_to_sign.txt")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fine_jax.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="folder with FashionGen (release .h5 files or the "
                   "reference layout)")
    p.add_argument("--output", required=True, help="folder to write the ArrayRecord dataset into")
    p.add_argument("--format", default="auto", choices=("auto", "h5", "reference_json"),
                   help="form of the input (default: detected)")
    p.add_argument("--splits", default="train,validation", help="comma-separated splits to convert")
    p.add_argument("--train_file", default="fashiongen_256_256_train.h5")
    p.add_argument("--eval_file", default="fashiongen_256_256_validation.h5")
    p.add_argument("--images_dir", default="images", help="reference layout: PNG folder")
    p.add_argument("--image_encoding", default="raw", choices=arrayrecord.IMAGE_ENCODINGS,
                   help="raw: uint8 pixels as in the release (fastest to read); png: lossless, smaller")
    p.add_argument("--rows_per_shard", type=int, default=2048)
    p.add_argument("--num_workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    return p.parse_args(argv)


class PrepareError(RuntimeError):
    """A problem with the input or the output; the message says what is expected."""


def _sources(args) -> tuple[str, dict]:
    root = os.path.abspath(os.path.expanduser(args.input))
    if not os.path.isdir(root):
        raise PrepareError(
            f"--input={args.input}: no such folder. Expected a folder holding either the FashionGen "
            f"release files ({args.train_file}, {args.eval_file}) or the reference layout "
            "(train/info_data.json, train/productid_list.json, validation/..., "
            f"annotation/fashiongen_{{train,val}}.json and {args.images_dir}/).")
    fmt = args.format
    if fmt == "auto":
        fmt = datasets.detect_format(root, args.train_file, args.eval_file)
        if fmt in (None, "arrayrecord"):
            raise PrepareError(
                f"--input={args.input}: found neither {args.train_file} / {args.eval_file} nor "
                "train|validation/info_data.json there" +
                (" (it already holds an ArrayRecord dataset)" if fmt == "arrayrecord" else ""))
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in datasets.SPLITS]
    if unknown or not splits:
        raise PrepareError(f"--splits={args.splits}: use train and/or validation")
    try:
        return fmt, {split: datasets.open_fashiongen(root, split, fmt, args.train_file, args.eval_file,
                                                     args.images_dir) for split in splits}
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise PrepareError(f"--input={args.input} ({fmt}): {e}") from None


def run(args, log=print) -> str:
    fmt, sources = _sources(args)
    for split, source in sources.items():
        log(f"{split}: {source!r} ({fmt})")
    t0 = time.time()
    try:
        out = arrayrecord.write_dataset(sources, args.output, image_encoding=args.image_encoding,
                                        rows_per_shard=args.rows_per_shard,
                                        num_workers=args.num_workers, overwrite=args.overwrite, log=log)
    except FileExistsError as e:
        raise PrepareError(str(e)) from None
    for name in TABLES:
        src = os.path.join(args.input, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(args.output, name))
    for split in sources:
        ds = arrayrecord.FashionGenArrayRecordSource(out, split)
        log(f"{split}: {len(ds)} rows, {ds.num_products} products, {len(ds.categories)} categories, "
            f"{len(ds.subcategories)} subcategories")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    log(f"wrote {out} ({size / 2**20:.1f} MiB, {args.image_encoding} images) in {time.time() - t0:.1f}s")
    missing = [n for n in TABLES if not os.path.isfile(os.path.join(args.output, n))]
    log(f"use it with --config.data.data_dir={os.path.abspath(args.output)}" +
        (f" (copy {' and '.join(missing)} there first)" if missing else ""))
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

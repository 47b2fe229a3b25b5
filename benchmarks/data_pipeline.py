"""Stage-1 input pipeline throughput: records/s of read + augment + tokenize + corrupt + batch.

    python benchmarks/data_pipeline.py                       # writes its own 256 px rows
    python benchmarks/data_pipeline.py --form=arrayrecord --sweep   # as training reads them
    python benchmarks/data_pipeline.py --data=/data/fashiongen --workers=8

Without ``--data`` it writes a few hundred 256x256 rows of the embedded synthetic set in the
FashionGen HDF5 schema (with its vocab and category table) into a temporary folder;
``--form=arrayrecord`` converts those rows into the prepared ArrayRecord dataset
(``fine_jax.data.prepare``'s output) and reads that. With ``--data`` it reads a FashionGen folder in any form (release .h5, reference JSON layout, prepared ArrayRecord)
or one .h5 file, and the vocab / category table from that folder (or ``--vocab`` /
``--categories``). ``--captions`` takes a JSON list of {"caption": ...} (e.g. the reference's
fashiongen_val.json) to replace the descriptions with real-length ones.

It prints a per-record profile of the pipeline's parts in one thread, then the pipeline's rate with
one process (one thread: the per-core rate) and with N worker processes, and how many cores a host
needs for the reference's 1,500 records/s. ``--sweep`` measures the rate for every combination of
``--sweep_workers``, ``--sweep_threads`` and ``--sweep_prefetch`` (the ``data.num_workers``,
``data.num_threads`` and ``data.prefetch`` settings), and with ``--step_s`` the input wait a
training step of that length would see: the time a batch takes beyond the step it overlaps with.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fine_jax import datasets  # noqa: E402
from fine_jax.data import image as image_ops  # noqa: E402
from fine_jax.data import pipeline  # noqa: E402
from fine_jax.data import text as text_ops  # noqa: E402
from fine_jax.data.fashiongen import FashionGenH5Source  # noqa: E402

TARGET_RECORDS_PER_S = 1500
TARGET_CORES = 16


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="FashionGen folder (any form) or one .h5 file")
    p.add_argument("--split", default="train")
    p.add_argument("--products", type=int, default=64, help="synthetic products written (4 views each)")
    p.add_argument("--vocab", default="")
    p.add_argument("--categories", default="")
    p.add_argument("--captions", default="", help="JSON list of {'caption': str} to use as descriptions")
    p.add_argument("--lexicon", default="wordnet", choices=("wordnet", "none"))
    p.add_argument("--wordnet_dir", default="")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--form", default="h5", choices=("h5", "arrayrecord"),
                   help="without --data: the form the written rows are read in")
    p.add_argument("--sweep", action="store_true", help="rate of every workers/threads/prefetch")
    p.add_argument("--sweep_workers", default="0,1,2")
    p.add_argument("--sweep_threads", default="1,2,4")
    p.add_argument("--sweep_prefetch", default="2,4")
    p.add_argument("--step_s", type=float, default=0.0,
                   help="a training step's seconds at --batch: print the input wait it would see")
    p.add_argument("--json", default="", help="also write the measurements to this file")
    return p.parse_args(argv)


class WithCaptions:
    """A row source whose descriptions are replaced, cyclically, by the given captions."""

    def __init__(self, source, captions):
        self.source, self.captions = source, list(captions)
        self.productid_list = source.productid_list

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = self.source[i]
        return {**record, "description": self.captions[record["product_index"] % len(self.captions)]}


def synthetic_rows(directory: str, products: int, form: str = "h5"):
    from fine_jax.data import synthetic

    root = pathlib.Path(directory) / "synthetic"
    synthetic.generate_dataset(root, seed=0, num_train=products, num_validation=4, views=4,
                               image_size=256)
    source = FashionGenH5Source(root / synthetic.TRAIN_FILE)
    if form == "arrayrecord":
        from fine_jax.data import arrayrecord

        prepared = pathlib.Path(directory) / "prepared"
        arrayrecord.write_dataset({"train": source}, prepared, log=lambda *_: None)
        source = datasets.open_fashiongen(prepared, "train", "arrayrecord")
    return source, root / synthetic.VOCAB_FILE, root / synthetic.CATEGORY_SIGN_FILE


def open_data(args, tmp):
    if not args.data:
        return synthetic_rows(tmp, args.products, args.form)
    path = pathlib.Path(args.data).expanduser()
    if path.is_file():
        source, root = FashionGenH5Source(path), path.parent
    else:
        fmt = datasets.detect_format(path)
        if fmt is None:
            sys.exit(f"error: no FashionGen data in {path}")
        source, root = datasets.open_fashiongen(path, args.split, fmt), path
    return source, root / "vocab.txt", root / "categorys_to_sign.txt"


def make_lexicon(args):
    if args.lexicon == "none":
        return text_ops.Lexicon.empty()
    from fine_jax.data import wordnet

    try:
        return wordnet.WordNetLexicon(args.wordnet_dir or None)
    except wordnet.WordNetMissing as e:
        sys.exit(f"error: {e}")


def per_record_ms(fn, n):
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e3


def profile(source, transform, n):
    """Milliseconds per record of each part, one thread (WordNet memo warmed first)."""
    rng = np.random.default_rng(0)
    records = [source[i % len(source)] for i in range(n)]
    for r in records:
        text_ops.build_stage1_text(r, transform.tokenizer, transform.category_symbols,
                                   transform.lexicon, rng, transform.max_len)
    size = transform.image_size

    def crop_flip(i):
        img = image_ops.random_resized_crop(records[i]["image"], rng, size)
        return image_ops.horizontal_flip(img) if rng.random() < 0.5 else img

    cropped = [crop_flip(i) for i in range(n)]
    parts = {
        "read (source[i])": per_record_ms(lambda i: source[i % len(source)], n),
        "crop + resize + flip": per_record_ms(crop_flip, n),
        "RandAugment N=2 M=7": per_record_ms(lambda i: image_ops.rand_augment(cropped[i], rng), n),
        "normalize": per_record_ms(lambda i: image_ops.normalize(cropped[i]), n),
        "text (tokenize, corrupt, prompts)": per_record_ms(lambda i: text_ops.build_stage1_text(
            records[i], transform.tokenizer, transform.category_symbols, transform.lexicon, rng,
            transform.max_len), n),
    }
    for name in image_ops.RANDAUG_OPS:
        parts[f"  op {name} (when applied)"] = per_record_ms(
            lambda i: image_ops.apply_op(cropped[i], name, 7, rng), max(8, n // 4))
    return parts


def rate(source, transform, args, num_workers, num_threads=1, prefetch=2):
    """Records/s of the stage-1 pipeline after its first batch (worker start-up excluded)."""
    ds = pipeline.train_dataset(source, transform, args.batch, seed=0, num_threads=num_threads,
                                prefetch=prefetch, num_workers=num_workers)
    it = iter(ds)
    next(it)
    for _ in range(max(1, num_workers)):  # every worker has produced a batch
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    elapsed = time.perf_counter() - t0
    del it
    return args.batches * args.batch / elapsed


def input_wait(batch: int, records_per_s: float, step_s: float) -> float:
    """Fraction of a step spent waiting for input when batches are prepared while the step runs:
    the part of a batch's preparation time that the step does not cover."""
    return max(0.0, batch / records_per_s - step_s) / step_s


def sweep(source, transform, args):
    """Rate (and input wait at ``--step_s``) of every workers/threads/prefetch combination."""
    rows = []
    print(f"\nsweep, batch {args.batch}, {args.image_size} px"
          + (f", input wait for a {args.step_s:g} s step" if args.step_s else "") + ":")
    print(f"  {'workers':>7} {'threads':>7} {'prefetch':>8} {'records/s':>10}"
          + (f" {'wait %':>7}" if args.step_s else ""))
    for workers in map(int, args.sweep_workers.split(",")):
        for threads in map(int, args.sweep_threads.split(",")):
            for prefetch in map(int, args.sweep_prefetch.split(",")):
                r = rate(source, transform, args, workers, threads, prefetch)
                row = dict(workers=workers, threads=threads, prefetch=prefetch, records_per_s=r)
                line = f"  {workers:>7} {threads:>7} {prefetch:>8} {r:>10.1f}"
                if args.step_s:
                    row["input_wait"] = input_wait(args.batch, r, args.step_s)
                    line += f" {100 * row['input_wait']:>7.1f}"
                print(line, flush=True)
                rows.append(row)
    best = max(rows, key=lambda x: x["records_per_s"])
    print(f"  fastest: num_workers={best['workers']} num_threads={best['threads']} "
          f"prefetch={best['prefetch']} ({best['records_per_s']:.1f} records/s)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"batch": args.batch, "image_size": args.image_size, "form": args.form,
             "cores": os.cpu_count(), "step_s": args.step_s, "sweep": rows}, indent=1))
    return rows


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        source, vocab, categories = open_data(args, tmp)
        vocab = pathlib.Path(args.vocab or vocab)
        categories = pathlib.Path(args.categories or categories)
        if args.captions:
            source = WithCaptions(source, [d["caption"] for d in json.loads(
                pathlib.Path(args.captions).read_text())])
        transform = pipeline.Stage1Transform(
            tokenizer=text_ops.Tokenizer.from_vocab_file(vocab),
            category_symbols=text_ops.load_category_symbols(categories), lexicon=make_lexicon(args),
            image_size=args.image_size, max_len=180)
        first = source[0]["image"].shape
        print(f"data: {len(source)} rows of {first} images ({time.time() - t0:.1f}s to open/write); "
              f"vocab {vocab} ({transform.tokenizer.vocab_size}); lexicon {transform.lexicon!r}")
        print(f"host: {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.2f}")

        parts = profile(source, transform, min(len(source), 128))
        total = sum(v for k, v in parts.items() if not k.startswith("  "))
        print("\nper record, one thread (ms):")
        for name, ms in parts.items():
            print(f"  {name:<36} {ms:7.2f}")
        print(f"  {'sum of the parts':<36} {total:7.2f}  -> {1e3 / total:.0f} records/s")

        one = rate(source, transform, args, num_workers=0)
        print(f"\nstage-1 pipeline, batch {args.batch}, {args.image_size} px:")
        print(f"  1 process, 1 thread:  {one:7.1f} records/s  (per-core rate)")
        many = rate(source, transform, args, num_workers=args.workers) if args.workers > 1 else one
        print(f"  {args.workers} worker processes: {many:7.1f} records/s")
        if args.sweep:
            sweep(source, transform, args)
        need = TARGET_RECORDS_PER_S / TARGET_CORES
        print(f"\ntarget {TARGET_RECORDS_PER_S} records/s on {TARGET_CORES} cores = {need:.0f} "
              f"records/s per core; measured per-core {one:.0f} -> {TARGET_CORES} cores ~ "
              f"{one * TARGET_CORES:.0f} records/s ({'meets' if one >= need else 'misses'} the target)")


if __name__ == "__main__":
    main()

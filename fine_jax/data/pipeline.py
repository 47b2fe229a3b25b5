"""grain input pipelines: stage-1, stage-2 and TGIR training batches, and evaluation batches.

Training: items (image rows, products or triplets; :mod:`fine_jax.data.samplers`) -> shuffle
(re-drawn each epoch over the whole dataset) -> per-record random map (read, augment images, build
the text) -> each process's share of the epoch (every process_count-th record) -> batch
(drop_remainder, per epoch) -> repeat -> prefetch (threads, or worker processes with
``num_workers``). Every random choice of a record is drawn from a generator seeded by
(seed, the record's position in the stream), so the stream depends only on the seed, the step and
the process index, and a restored iterator continues on the exact next batch.

Bad records. A record whose image is missing or cannot be decoded
(:class:`~fine_jax.data.image.CorruptImage`) is *replaced* by the next readable record of the
source (the whole record, so image and text stay a matching pair), logged with the reason, and
counted: every training example carries ``bad_records``, the number of unreadable records skipped
to produce it, which the training loop sums and reports. More than ``MAX_CONSECUTIVE_BAD``
unreadable records in a row stops the pipeline with an error (the data is damaged, not a record).
In evaluation an unreadable image becomes a uniform grey image, logged and counted likewise.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from fine_jax.data import fashioniq as fiq_ops
from fine_jax.data import image as image_ops
from fine_jax.data import samplers
from fine_jax.data import text as text_ops

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 64
BAD_KEY = "bad_records"


class DataCorrupted(RuntimeError):
    """Too many unreadable records in a row: the dataset itself is damaged or incomplete."""


def read_or_replace(source, index: int) -> dict[str, Any]:
    """``source[index]``, or the next readable record when it raises CorruptImage (see above)."""
    n = len(source)
    for skipped in range(min(MAX_CONSECUTIVE_BAD, n)):
        try:
            record = source[(index + skipped) % n]
        except image_ops.CorruptImage as e:
            log.warning("unreadable record replaced by the next one: %s", e)
            continue
        return {**record, BAD_KEY: skipped}
    raise DataCorrupted(f"{min(MAX_CONSECUTIVE_BAD, n)} consecutive records of {source!r} from "
                        f"{index} on cannot be read; check the image files / shards")


class ReplaceCorrupt:
    """A source whose unreadable records are replaced by :func:`read_or_replace` (picklable)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return read_or_replace(self.source, int(index))

    def __repr__(self) -> str:
        return f"ReplaceCorrupt({self.source!r})"


@dataclasses.dataclass
class ImageAugment:
    """The training image transform of method_spec §6.4 with its config knobs."""

    image_size: int
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    randaug_n: int = 2
    randaug_m: float = 7

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image_ops.train_transform(img, rng, self.image_size, scale=tuple(self.crop_scale),
                                         hflip=self.hflip, randaug_n=self.randaug_n,
                                         randaug_m=self.randaug_m, normalized=False)


def with_twin_group(example: dict, twin_group) -> dict:
    """Adds the example's ``twin_group`` id (from its ``idx``) when a twin-group table is given."""
    if twin_group is not None:
        example["twin_group"] = np.int32(twin_group[int(example["idx"])])
    return example


@dataclasses.dataclass
class Stage1Transform:
    """One image row -> one stage-1 training example (picklable for grain workers)."""

    tokenizer: text_ops.Tokenizer
    category_symbols: Mapping[str, str]
    lexicon: Any  # text.Lexicon or wordnet.WordNetLexicon
    image_size: int
    max_len: int
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    randaug_n: int = 2
    randaug_m: float = 7
    fix_mlm_labels: bool = False
    symbol: bool = True
    attributes: bool = True
    clean_copy: bool = False
    twin_group: Any = None  # product index -> twin-group id (loss.itm_exclude_twins), or None

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        img = image_ops.train_transform(record["image"], rng, self.image_size,
                                        scale=tuple(self.crop_scale), hflip=self.hflip,
                                        randaug_n=self.randaug_n, randaug_m=self.randaug_m,
                                        normalized=False)
        txt = text_ops.build_stage1_text(record, self.tokenizer, self.category_symbols, self.lexicon,
                                         rng, self.max_len, fix_mlm_labels=self.fix_mlm_labels,
                                         symbol=self.symbol, attributes=self.attributes,
                                         clean_copy=self.clean_copy)
        out = {"image": img, **txt, "idx": np.int32(record["product_index"]),
               BAD_KEY: np.int32(record.get(BAD_KEY, 0))}
        return with_twin_group(out, self.twin_group)


@dataclasses.dataclass
class Stage2Transform:
    """One product -> one stage-2 example: a random image row of it and the clean stage-2 text."""

    source: Any
    tokenizer: text_ops.Tokenizer
    augment: ImageAugment
    max_len: int
    twin_group: Any = None  # product index -> twin-group id (loss.itm_exclude_twins), or None

    def __call__(self, item: tuple[int, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        _, rows = item
        record = read_or_replace(self.source, samplers.draw_row(rows, rng))
        ids, mask = text_ops.build_stage2_text(record["description"], self.tokenizer, self.max_len)
        out = {"image": self.augment(record["image"], rng), "input_ids": ids,
               "attention_mask": mask, "idx": np.int32(record["product_index"]),
               BAD_KEY: np.int32(record[BAD_KEY])}
        return with_twin_group(out, self.twin_group)


@dataclasses.dataclass
class TGIRTransform:
    """One FashionIQ triplet -> reference and target images (each augmented), the query text."""

    tokenizer: text_ops.Tokenizer
    augment: ImageAugment
    max_len: int = fiq_ops.MAX_LEN

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids, mask = fiq_ops.encode_tgir_text(record["captions"], self.tokenizer, self.max_len)
        return {"reference_image": self.augment(record["reference_image"], rng),
                "target_image": self.augment(record["target_image"], rng),
                "input_ids": ids, "attention_mask": mask,
                "reference_id": np.int32(record["reference_id"]),
                "target_id": np.int32(record["target_id"]), "idx": np.int32(record["index"]),
                BAD_KEY: np.int32(record.get(BAD_KEY, 0))}


class GroupedShuffle(grain.MapDataset):
    """An epoch-wise shuffle that keeps each group's items next to each other.

    Every epoch draws a fresh order of the groups and, inside each group, of its items (numpy
    generator seeded by (seed, epoch)); consecutive items therefore land in the same batch, so a
    group's members are each other's in-batch negatives. ``groups`` partitions ``range(len(parent))``
    (an item in no group is a group of its own). Index ``epoch * len + k`` is item k of that
    epoch's order, as grain's own shuffle does, so ``repeat`` reshuffles every epoch.
    """

    def __init__(self, parent: grain.MapDataset, groups: Sequence[Sequence[int]], seed: int):
        super().__init__(parent)
        n = len(parent)
        seen = np.zeros(n, bool)
        self._groups = []
        for g in groups:
            g = np.asarray(g, np.int64)
            if g.size and (g.min() < 0 or g.max() >= n or seen[g].any() or len(set(g.tolist())) < g.size):
                raise ValueError("batch groups must be disjoint sets of item indices in "
                                 f"[0, {n})")
            seen[g] = True
            if g.size:
                self._groups.append(g)
        self._groups += [np.asarray([i]) for i in np.flatnonzero(~seen)]
        self._seed = int(seed)
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "GroupedShuffle"

    def order(self, epoch: int) -> np.ndarray:
        """The item order of one epoch (a permutation of ``range(len(self))``)."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng((self._seed, epoch))
            parts = [self._groups[g][rng.permutation(len(self._groups[g]))]
                     for g in rng.permutation(len(self._groups))]
            self._order = (epoch, np.concatenate(parts))
        return self._order[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, k = divmod(int(index), len(self))
        return self._parent[int(self.order(epoch)[k]) + epoch * len(self)]


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    steps = num_records // global_batch
    if steps < 1:
        raise ValueError(f"the training set has {num_records} records, fewer than one global batch "
                         f"of {global_batch}; lower train.global_batch_size")
    return steps


MAX_AUTO_WORKERS = 16


def resolve_workers(num_workers: int, backend: str | None = None) -> int:
    """``data.num_workers``, with -1 (auto) resolved for this process.

    Auto gives one worker process per core this process may run on, at most 16, when the model
    trains on an accelerator: the host's cores have nothing else to do, and one core's worker
    makes about 300 stage-1 records/s at 256 px (``benchmarks/data_pipeline.py --sweep``), so the
    reference's 1,500 records/s takes five or six. When the CPU itself trains, the cores belong to
    the step, and auto is 0: batches are made by threads in this process.
    """
    if num_workers >= 0:
        return num_workers
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend == "cpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores))


def training_stream(items: Sequence, transform, global_batch: int, seed: int,
                    num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                    num_threads: int = 2, prefetch: int = 4, num_workers: int = 0,
                    groups: Sequence[Sequence[int]] | None = None) -> grain.IterDataset:
    """Host-local batches of ``transform(item, rng)`` over ``items`` (see the module docstring).

    ``groups`` (disjoint lists of item indices) replaces the plain shuffle by
    :class:`GroupedShuffle`: each group's items arrive together (``data.batch_groups``).
    """
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    local_batch = global_batch // process_count
    ds = grain.MapDataset.source(items)
    # Shuffle before repeat: grain re-draws the permutation for every epoch (seed + epoch), and
    # batch() keeps each epoch's batches inside that epoch, like DistributedSampler + drop_last.
    ds = ds.shuffle(seed=seed) if groups is None else GroupedShuffle(ds, groups, seed)
    # Each record's random choices are seeded by its position in the *global* stream, so they do
    # not depend on how many processes share it.
    ds = ds.random_map(transform, seed=seed + 1)
    if process_count > 1:
        # DistributedSampler: every epoch's permutation of the whole dataset, cut to a multiple
        # of the process count, then every process_count-th record from process_index on. The
        # slices pass the epoch through, so each epoch deals a fresh share to every process.
        ds = ds[:len(ds) // process_count * process_count]
        ds = ds[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.repeat(num_epochs)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch))
    num_workers = resolve_workers(num_workers)
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def train_dataset(source: Sequence, transform: Stage1Transform, global_batch: int, seed: int,
                  **kwargs) -> grain.IterDataset:
    """Stage 1: one item per image row (``kwargs`` as :func:`training_stream`)."""
    return training_stream(ReplaceCorrupt(source), transform, global_batch, seed, **kwargs)


def stage2_dataset(transform: Stage2Transform, global_batch: int, seed: int,
                   **kwargs) -> grain.IterDataset:
    """Stage 2: one item per product of ``transform.source``, a random image of it each epoch."""
    return training_stream(samplers.ProductRows(transform.source), transform, global_batch, seed,
                           **kwargs)


def tgir_dataset(triplets: fiq_ops.TripletSource, transform: TGIRTransform, global_batch: int,
                 seed: int, **kwargs) -> grain.IterDataset:
    """Stage 3: one item per FashionIQ training triplet."""
    return training_stream(ReplaceCorrupt(triplets), transform, global_batch, seed, **kwargs)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class _GreyOnCorrupt:
    """Evaluation rows in order; an unreadable image becomes uniform grey (counted, logged)."""

    def __init__(self, source, image_shape: tuple[int, int, int]):
        self.source = source
        self.image_shape = image_shape

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {**self.source[int(i)], BAD_KEY: 0}
        except image_ops.CorruptImage as e:
            log.warning("unreadable evaluation image replaced by grey: %s", e)
            return {"image": np.full(self.image_shape, 128, np.uint8), "row": int(i), BAD_KEY: 1}


@dataclasses.dataclass
class _EvalImage:
    image_size: int

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"image": image_ops.test_transform(record["image"], self.image_size,
                                                  normalized=False),
                "row": np.int64(record["row"]), BAD_KEY: np.int32(record[BAD_KEY])}


def eval_image_batches(source: Sequence, image_size: int, batch_size: int,
                       num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """All rows of an evaluation source in order, test-transformed, in batches (last one short)."""
    rows = _GreyOnCorrupt(source, (image_size, image_size, 3))
    ds = grain.MapDataset.source(rows).map(_EvalImage(image_size))
    ds = ds.batch(batch_size, drop_remainder=False)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)))


class _GalleryImages:
    def __init__(self, fiq: fiq_ops.FashionIQ, names: Sequence[str]):
        self.fiq = fiq
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.fiq.load_image(self.names[int(i)]), "row": int(i)}

    def __repr__(self) -> str:
        return f"FashionIQ images in {self.fiq.image_dir}"


def fashioniq_image_batches(fiq: fiq_ops.FashionIQ, names: Sequence[str], image_size: int,
                            batch_size: int, num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """FashionIQ images by id (a gallery, or the reference images of the queries), in order."""
    return eval_image_batches(_GalleryImages(fiq, names), image_size, batch_size, num_threads)


def eval_texts(descriptions: Sequence[str], tokenizer: text_ops.Tokenizer,
               max_len: int) -> dict[str, np.ndarray]:
    """The evaluation text layout: "the image description is " + caption, [CLS] ... [SEP], padded."""
    ids, masks = zip(*(text_ops.encode_eval_caption(tokenizer, d, max_len) for d in descriptions))
    return {"input_ids": np.stack(ids).astype(np.int32),
            "attention_mask": np.stack(masks).astype(np.int32)}


def tgir_texts(captions: Sequence[Sequence[str]], tokenizer: text_ops.Tokenizer,
               max_len: int = fiq_ops.MAX_LEN) -> dict[str, np.ndarray]:
    """The TGIR query text layout (training and evaluation alike) for many triplets."""
    ids, masks = zip(*(fiq_ops.encode_tgir_text(c, tokenizer, max_len) for c in captions))
    return {"input_ids": np.stack(ids), "attention_mask": np.stack(masks)}

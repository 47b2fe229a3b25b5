"""grain input pipelines: stage-1 training batches and evaluation batches.

Training: source -> shard by process -> shuffle (re-drawn each epoch) -> per-record random map
(augment image, build the stage-1 text) -> batch (drop_remainder, per epoch) -> repeat ->
prefetch. Every random choice of a record is drawn from a generator seeded by (seed, the record's
position in the stream), so the stream depends only on the seed, the step and the process index,
and a restored iterator continues on the exact next batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from fine_jax.data import image as image_ops
from fine_jax.data import text as text_ops


@dataclasses.dataclass
class Stage1Transform:
    """One image row -> one stage-1 training example (picklable for grain workers)."""

    tokenizer: text_ops.Tokenizer
    category_symbols: Mapping[str, str]
    lexicon: text_ops.Lexicon
    image_size: int
    max_len: int
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    randaug_n: int = 2
    randaug_m: float = 7
    fix_mlm_labels: bool = False

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        img = image_ops.train_transform(record["image"], rng, self.image_size,
                                        scale=tuple(self.crop_scale), hflip=self.hflip,
                                        randaug_n=self.randaug_n, randaug_m=self.randaug_m)
        txt = text_ops.build_stage1_text(record, self.tokenizer, self.category_symbols, self.lexicon,
                                         rng, self.max_len, fix_mlm_labels=self.fix_mlm_labels)
        return {"image": img.astype(np.float32), **txt,
                "idx": np.int32(record["product_index"])}


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    steps = num_records // global_batch
    if steps < 1:
        raise ValueError(f"the training set has {num_records} records, fewer than one global batch "
                         f"of {global_batch}; lower train.global_batch_size")
    return steps


def train_dataset(source: Sequence, transform: Stage1Transform, global_batch: int, seed: int,
                  num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                  num_threads: int = 2, prefetch: int = 4, num_workers: int = 0) -> grain.IterDataset:
    """The stage-1 training stream as a grain IterDataset of host-local batches."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    local_batch = global_batch // process_count
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    # Shuffle before repeat: grain re-draws the permutation for every epoch (seed + epoch), and
    # batch() keeps each epoch's batches inside that epoch, like DistributedSampler + drop_last.
    ds = ds.shuffle(seed=seed)
    ds = ds.random_map(transform, seed=seed + 1)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.repeat(num_epochs)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch))
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


@dataclasses.dataclass
class _EvalImage:
    image_size: int

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"image": image_ops.test_transform(record["image"], self.image_size),
                "row": np.int64(record["row"])}


def eval_image_batches(source: Sequence, image_size: int, batch_size: int,
                       num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """All rows of an evaluation source in order, test-transformed, in batches (last one short)."""
    ds = grain.MapDataset.source(source).map(_EvalImage(image_size))
    ds = ds.batch(batch_size, drop_remainder=False)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)))


def eval_texts(descriptions: Sequence[str], tokenizer: text_ops.Tokenizer,
               max_len: int) -> dict[str, np.ndarray]:
    """The evaluation text layout: "the image description is " + caption, [CLS] ... [SEP], padded."""
    ids, masks = zip(*(text_ops.encode_eval_caption(tokenizer, d, max_len) for d in descriptions))
    return {"input_ids": np.stack(ids).astype(np.int32),
            "attention_mask": np.stack(masks).astype(np.int32)}

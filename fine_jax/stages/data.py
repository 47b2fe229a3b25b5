"""What each stage trains on: the training items, their transform and the grain stream.

``training_data(cfg)`` resolves the stage's dataset (only what training needs) and returns a
:class:`TrainingData`: the number of items per epoch, the vocab size, a one-line description and
``stream(seed, process_index, process_count)`` building the host-local batch stream.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fine_jax import datasets
from fine_jax.data import pipeline


@dataclasses.dataclass
class TrainingData:
    num_items: int  # items per epoch: image rows (stage 1), products (stage 2), triplets (stage 3)
    vocab_size: int
    description: str
    stream: Callable[..., Any]  # (seed, process_index, process_count) -> grain.IterDataset
    vit_source: Any = None  # FashionGen training rows, for the stage-1 ViT warm-start


def _stream_kwargs(cfg) -> dict:
    d = cfg.data
    return dict(num_threads=d.num_threads, prefetch=d.prefetch, num_workers=d.num_workers)


def _augment(cfg) -> pipeline.ImageAugment:
    d = cfg.data
    return pipeline.ImageAugment(cfg.model.image_size, tuple(d.crop_scale), d.hflip, d.randaug_n,
                                 d.randaug_m)


def twin_groups(cfg, data, source) -> list[list[int]] | None:
    """``data.batch_groups="twins"`` (the embedded set): the training products of each twin group,
    as product indices of ``source``; None when batches are not grouped."""
    if not cfg.data.batch_groups:
        return None
    return _twin_product_groups(data, source)


def twin_group_ids(cfg, data, source):
    """``loss.itm_exclude_twins`` (the embedded set): each product index's twin-group id (the
    smallest product index of its group; a product outside every group keeps its own index), which
    the transforms put into each example as ``twin_group``; None when the loss does not need it."""
    if not cfg.loss.itm_exclude_twins:
        return None
    import numpy as np

    ids = np.arange(source.num_products, dtype=np.int32)
    for g in _twin_product_groups(data, source):
        ids[g] = min(g)
    return ids


def _twin_product_groups(data, source) -> list[list[int]]:
    from fine_jax.data import synthetic

    parent: dict[int, int] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _ in synthetic.load_twins(data.root, "train"):
        parent[find(a)] = find(b)
    index_of = {int(pid): k for k, (pid, _) in enumerate(source.productid_list)}
    groups: dict[int, list[int]] = {}
    for pid in parent:
        if pid in index_of:
            groups.setdefault(find(pid), []).append(index_of[pid])
    return [sorted(g) for g in groups.values()]


def stage1_row_groups(products: list[list[int]], views: list, kind: str) -> list[list[int]]:
    """Stage 1 items are image rows; the groups of rows that share a batch.

    ``twins``: every image of a twin group's products (each product's views together, so a batch
    holds about a third as many products as rows). ``twin_views``: the k-th image of each of the
    group's products together, one group per view, so that a product's twin shares its batch
    while its other views are spread like any other row.
    """
    if kind == "twins":
        return [[int(r) for p in g for r in views[p]] for g in products]
    groups = []
    for g in products:
        for k in range(max(len(views[p]) for p in g)):
            groups.append([int(views[p][k]) for p in g if k < len(views[p])])
    return groups


def pretrain_data(cfg) -> TrainingData:
    data = datasets.resolve(cfg, splits=("train",))
    d = cfg.data
    transform = pipeline.Stage1Transform(
        tokenizer=data.tokenizer, category_symbols=data.category_symbols, lexicon=data.lexicon,
        image_size=cfg.model.image_size, max_len=d.max_len, crop_scale=tuple(d.crop_scale),
        hflip=d.hflip, randaug_n=d.randaug_n, randaug_m=d.randaug_m,
        fix_mlm_labels=d.fix_mlm_labels, symbol=d.stage1_symbol, attributes=d.stage1_attributes,
        clean_copy=cfg.loss.clean_itc_itm_text,
        twin_group=twin_group_ids(cfg, data, data.train))
    bg = cfg.train.global_batch_size
    products = twin_groups(cfg, data, data.train)
    rows = None if products is None else stage1_row_groups(
        products, [data.train.productid_list[p][1] for p in range(data.train.num_products)],
        d.batch_groups)

    def stream(seed, process_index=0, process_count=1):
        return pipeline.train_dataset(data.train, transform, bg, seed=seed, num_epochs=None,
                                      process_index=process_index, process_count=process_count,
                                      groups=rows, **_stream_kwargs(cfg))

    return TrainingData(len(data.train), data.tokenizer.vocab_size,
                        f"train rows {len(data.train)} ({data.train.num_products} products)",
                        stream, vit_source=data.train)


def retrieval_data(cfg) -> TrainingData:
    data = datasets.resolve(cfg, splits=("train",), lexicon=False)
    transform = pipeline.Stage2Transform(data.train, data.tokenizer, _augment(cfg),
                                         cfg.data.max_len,
                                         twin_group=twin_group_ids(cfg, data, data.train))
    bg = cfg.train.global_batch_size
    groups = twin_groups(cfg, data, data.train)  # stage 2 items are products

    def stream(seed, process_index=0, process_count=1):
        return pipeline.stage2_dataset(transform, bg, seed=seed, num_epochs=None,
                                       process_index=process_index, process_count=process_count,
                                       groups=groups, **_stream_kwargs(cfg))

    n = data.train.num_products
    return TrainingData(n, data.tokenizer.vocab_size,
                        f"train products {n} ({len(data.train)} images, one drawn per epoch)",
                        stream)


def tgir_data(cfg) -> TrainingData:
    data = datasets.resolve_fashioniq(cfg)
    triplets = data.fiq.train_set()
    transform = pipeline.TGIRTransform(data.tokenizer, _augment(cfg), cfg.data.max_len)
    bg = cfg.train.global_batch_size

    def stream(seed, process_index=0, process_count=1):
        return pipeline.tgir_dataset(triplets, transform, bg, seed=seed, num_epochs=None,
                                     process_index=process_index, process_count=process_count,
                                     **_stream_kwargs(cfg))

    return TrainingData(len(triplets), data.tokenizer.vocab_size,
                        f"train triplets {len(triplets)} (FashionIQ, 3 categories merged)", stream)

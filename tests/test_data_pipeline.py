"""grain pipelines on real-format files: the stage samplers, exact resume from the iterator state,
process sharding, worker processes, and bad records replaced, counted and reported."""
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import pytest

from fine_jax import config as config_lib
from fine_jax.data import pipeline, reference_json, samplers
from fine_jax.data.fashiongen import FashionGenH5Source
from fine_jax.data.text import Lexicon, Tokenizer, build_stage2_text
from test_data_sources import TABLES, write_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("release"), n_train=12, n_val=6)


@pytest.fixture(scope="module")
def reference(release, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    reference_json.write_reference_layout(release / "fashiongen_256_256_train.h5", root, "train")
    return root


@pytest.fixture(scope="module")
def tok(release):
    return Tokenizer.from_vocab_file(release / "vocab.txt")


@pytest.fixture
def absl_flags_parsed():
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def stage1(tok, **kw):
    return pipeline.Stage1Transform(tokenizer=tok, category_symbols=TABLES, lexicon=Lexicon.empty(),
                                    image_size=32, max_len=48, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# Stage 1


def test_stage1_one_item_per_row_with_product_index(release, tok):
    src = FashionGenH5Source(release / "fashiongen_256_256_train.h5")
    ds = pipeline.train_dataset(src, stage1(tok), 4, seed=0, num_epochs=1)
    batches = list(ds)
    assert len(batches) == len(src) // 4
    b = batches[0]
    # uint8 to the device (a quarter of float32's bytes); the ViT normalises there
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["input_ids"].shape == (4, 48) and b["input_ids"][:, 0].tolist() == [tok.cls_id] * 4
    assert b["bad_records"].tolist() == [0] * 4
    idx = np.concatenate([x["idx"] for x in batches])
    assert len(set(idx.tolist())) > 1 and set(idx.tolist()) <= set(range(src.num_products))
    # idx is the product index of the row the example was made from
    symbol_of_product = {p: TABLES[src[rows[0]]["category"].lower()] for p, (_, rows)
                         in enumerate(src.productid_list)}
    for x in batches:
        for i, p in zip(x["input_ids"][:, 1], x["idx"]):
            assert tok.id_to_token(int(i)) == symbol_of_product[int(p)]


def test_stage1_same_seed_same_stream_and_epochs_differ(release, tok):
    src = FashionGenH5Source(release / "fashiongen_256_256_train.h5")
    a = take(iter(pipeline.train_dataset(src, stage1(tok), 4, seed=3)), 12)
    b = take(iter(pipeline.train_dataset(src, stage1(tok), 4, seed=3)), 12)
    c = take(iter(pipeline.train_dataset(src, stage1(tok), 4, seed=4)), 2)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    spe = len(src) // 4
    epoch0 = np.concatenate([x["idx"] for x in a[:spe]])
    epoch1 = np.concatenate([x["idx"] for x in a[spe:2 * spe]])
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)


def test_grouped_shuffle_keeps_groups_together_and_reshuffles_every_epoch():
    import grain

    groups = [[0, 1], [2, 3, 4], [7, 9]]
    ds = pipeline.GroupedShuffle(grain.MapDataset.source(list(range(10))), groups, seed=5)
    epochs = [[ds[e * 10 + k] for k in range(10)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10))
        for g in groups:  # each group's items are consecutive
            pos = sorted(order.index(i) for i in g)
            assert pos == list(range(pos[0], pos[0] + len(g)))
    assert epochs[0] != epochs[1] != epochs[2]
    again = pipeline.GroupedShuffle(grain.MapDataset.source(list(range(10))), groups, seed=5)
    assert [again[k] for k in range(10)] == epochs[0]
    with pytest.raises(ValueError, match="disjoint"):
        pipeline.GroupedShuffle(grain.MapDataset.source(list(range(10))), [[0, 1], [1, 2]], 0)
    with pytest.raises(ValueError, match="disjoint"):
        pipeline.GroupedShuffle(grain.MapDataset.source(list(range(10))), [[0, 10]], 0)


def test_twin_batches_put_each_twin_group_in_one_batch(tmp_path):
    from fine_jax import datasets
    from fine_jax.config import load_config_file
    from fine_jax.data import synthetic
    from fine_jax.stages import data as stage_data

    c = load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    c.data.data_dir = str(tmp_path)
    c.data.synthetic_train_products, c.data.synthetic_eval_products = 48, 16
    c.data.synthetic_views = 2
    c.train.global_batch_size = 12
    data = datasets.resolve(c, splits=("train",), lexicon=False)
    src = data.train
    twin = {}
    for a, b, _ in synthetic.load_twins(data.root, "train"):
        twin.setdefault(a, set()).add(b)
        twin.setdefault(b, set()).add(a)
    pid = [p for p, _ in src.productid_list]

    def twins_in_the_same_batch(grouping):
        c.data.batch_groups = grouping
        together = apart = 0
        for b in take(iter(stage_data.pretrain_data(c).stream(66)), len(src) // 12):
            products = {pid[i] for i in b["idx"].tolist()}
            for p in products:
                n = len(twin.get(p, set()) & products)
                together, apart = together + n, apart + len(twin.get(p, set())) - n
        return together / (together + apart)

    # A group straddles two batches only at a batch boundary; a plain shuffle rarely pairs them.
    assert twins_in_the_same_batch("twins") > 0.7
    assert twins_in_the_same_batch("twin_views") > 0.7
    assert twins_in_the_same_batch("") < 0.4


def test_twin_group_ids_reach_the_batches_of_stages_1_and_2(tmp_path):
    from fine_jax import datasets
    from fine_jax.config import ConfigError, load_config_file, validate
    from fine_jax.data import synthetic
    from fine_jax.stages import data as stage_data

    c = load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    c.data.data_dir = str(tmp_path)
    c.data.synthetic_train_products, c.data.synthetic_eval_products = 48, 16
    c.data.synthetic_views = 2
    c.train.global_batch_size = 12
    c.loss.itm_exclude_twins = False
    assert "twin_group" not in next(iter(stage_data.pretrain_data(c).stream(66)))
    c.loss.itm_exclude_twins = True
    data = datasets.resolve(c, splits=("train",), lexicon=False)
    index = {p: k for k, (p, _) in enumerate(data.train.productid_list)}
    members = {}  # product index -> its twin group's product indices
    for a, b, _ in synthetic.load_twins(data.root, "train"):
        merged = members.get(index[a], {index[a]}) | members.get(index[b], {index[b]})
        members.update({k: merged for k in merged})
    for make in (stage_data.pretrain_data, stage_data.retrieval_data):
        if make is stage_data.retrieval_data:
            c.stage = "retrieval"
            c.loss.scratch_warmup_steps = 0
            c.loss.scratch_warmup_maa_keys = c.loss.scratch_warmup_random_negatives = False
        for b in take(iter(make(c).stream(66)), 4):
            idx, group = b["idx"].tolist(), b["twin_group"].tolist()
            assert b["twin_group"].dtype == np.int32
            for i, g in zip(idx, group):  # a group is named by its smallest product index
                assert g == min(members[i])
    c.data.source = "fashiongen"
    c.data.batch_groups = ""
    c.loss.queue_size = 1020
    with pytest.raises(ConfigError, match="itm_exclude_twins"):
        validate(c)


def test_stage1_row_groups_put_one_view_of_each_twin_together():
    from fine_jax.stages.data import stage1_row_groups

    views = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10], [11]]  # rows of products 0-4
    products = [[0, 1, 2], [3, 4]]  # two twin groups
    assert stage1_row_groups(products, views, "twins") == [[0, 1, 2, 3, 4, 5, 6, 7],
                                                           [8, 9, 10, 11]]
    groups = stage1_row_groups(products, views, "twin_views")
    assert groups == [[0, 3, 6], [1, 4, 7], [2, 5], [8, 11], [9], [10]]
    # Either way every row of a grouped product is in exactly one group.
    flat = sorted(r for g in groups for r in g)
    assert flat == list(range(12))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_restores_the_exact_next_batch(release, tok, num_workers, absl_flags_parsed):
    src = FashionGenH5Source(release / "fashiongen_256_256_train.h5")

    def make():
        return iter(pipeline.train_dataset(src, stage1(tok), 4, seed=1, num_workers=num_workers))

    it = make()
    take(it, 5)
    state = it.get_state()
    expected = take(it, 4)
    fresh = make()
    fresh.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
    assert_batches_equal(take(fresh, 4), expected)


def test_worker_processes_give_the_same_batches_as_threads(release, tok, absl_flags_parsed):
    src = FashionGenH5Source(release / "fashiongen_256_256_train.h5")
    threads = take(iter(pipeline.train_dataset(src, stage1(tok), 4, seed=2)), 6)
    workers = take(iter(pipeline.train_dataset(src, stage1(tok), 4, seed=2, num_workers=2)), 6)
    assert_batches_equal(threads, workers)


def test_process_shards_are_disjoint_and_depend_only_on_seed_and_index(release, tok):
    src = FashionGenH5Source(release / "fashiongen_256_256_train.h5")

    def epoch(index, count=2):
        ds = pipeline.train_dataset(src, stage1(tok, randaug_n=0), 6, seed=5, num_epochs=1,
                                    process_index=index, process_count=count)
        return list(ds)

    p0, p1 = epoch(0), epoch(1)
    assert p0[0]["image"].shape[0] == 3  # the local batch
    rows0 = {int(i) for b in p0 for i in b["idx"]}
    assert_batches_equal(epoch(0), p0)
    # the two processes draw from disjoint halves of the rows: rows 0,2,4.. and 1,3,5..
    even = [src[r]["product_index"] for r in range(0, len(src), 2)]
    assert rows0 <= set(even)
    assert not np.array_equal(p0[0]["image"], p1[0]["image"])
    with pytest.raises(ValueError, match="not divisible by 4 processes"):
        pipeline.train_dataset(src, stage1(tok), 6, seed=5, process_index=0, process_count=4)


# ----------------------------------------------------------------------------------------------
# Stage 2 and evaluation sets


def test_stage2_one_item_per_product_random_image_each_epoch(release, tok):
    src = FashionGenH5Source(release / "fashiongen_256_256_train.h5")
    aug = pipeline.ImageAugment(32, randaug_n=0, hflip=False, crop_scale=(1.0, 1.0))
    transform = pipeline.Stage2Transform(source=src, tokenizer=tok, augment=aug, max_len=40)
    batches = take(iter(pipeline.stage2_dataset(transform, 4, seed=0)), 3 * 20)
    spe = src.num_products // 4
    epoch0 = np.concatenate([b["idx"] for b in batches[:spe]])
    assert sorted(epoch0.tolist()) == list(range(spe * 4))  # every product once per epoch (drop_last)
    ids, _ = build_stage2_text(src[0]["description"], tok, 40)
    pixels = {}
    for b in batches:
        for p, image, text in zip(b["idx"], b["image"], b["input_ids"]):
            np.testing.assert_array_equal(text, build_stage2_text(
                src[src.productid_list[int(p)][1][0]]["description"], tok, 40)[0])
            pixels.setdefault(int(p), set()).add(image.tobytes())
    # product 2 has 3 images (rows 3-5): over 20 epochs several of them were drawn
    assert len(pixels[2]) >= 2 and len(pixels[0]) == 1
    assert ids[0] == tok.cls_id and tok.sep_id not in ids.tolist()


def test_stage2_and_tgir_iterators_restore_the_exact_next_batch(release, tok, tmp_path):
    from test_data_fashioniq import write_fashioniq

    from fine_jax.data import fashioniq

    src = FashionGenH5Source(release / "fashiongen_256_256_train.h5")
    aug = pipeline.ImageAugment(32)
    stage2 = pipeline.Stage2Transform(source=src, tokenizer=tok, augment=aug, max_len=40)
    triplets = fashioniq.FashionIQ(write_fashioniq(tmp_path / "fiq")).train_set()
    makers = [lambda: iter(pipeline.stage2_dataset(stage2, 4, seed=7)),
              lambda: iter(pipeline.tgir_dataset(triplets, pipeline.TGIRTransform(tok, aug), 4, seed=7))]
    for make in makers:
        it = make()
        take(it, 4)  # past the first epoch of both (3 batches)
        state = it.get_state()
        expected = take(it, 3)
        fresh = make()
        fresh.set_state(state)
        assert_batches_equal(take(fresh, 3), expected)


def test_eval_set(release):
    src = FashionGenH5Source(release / "fashiongen_256_256_validation.h5")
    ev = samplers.eval_set(src)
    assert ev.num_texts == 6 and ev.num_images == 12
    assert ev.first_rows.tolist() == [0, 1, 3, 6, 7, 9]
    assert ev.descriptions[2] == src[3]["description"]
    assert ev.product_ids == [900 + p for p in range(6)]
    assert ev.image_product.tolist() == [0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5]
    assert ev.subcategory_products == {"T-SHIRTS": [0, 4], "DENIM JACKETS": [1, 5], "JEANS": [2],
                                       "LOW TOP SNEAKERS": [3]}
    assert ev.image_subcategory[4] == "JEANS"


# ----------------------------------------------------------------------------------------------
# Bad records


def _broken_reference(reference, tmp_path, remove_rows):
    root = tmp_path / "ref"
    shutil.copytree(reference, root)
    src = reference_json.FashionGenJsonSource(root, "train")
    for r in remove_rows:
        (root / "images" / src._image_names[r]).unlink()
    return reference_json.FashionGenJsonSource(root, "train")


def test_missing_images_are_replaced_counted_and_logged(reference, tok, tmp_path, caplog):
    src = _broken_reference(reference, tmp_path, remove_rows=[7, 8])
    with caplog.at_level(logging.WARNING, logger="fine_jax.data.pipeline"):
        batches = list(pipeline.train_dataset(src, stage1(tok), 4, seed=0, num_epochs=1))
    assert len(batches) == len(src) // 4
    bad = np.concatenate([b["bad_records"] for b in batches])
    assert sorted(bad[bad > 0].tolist()) == [1, 2]  # row 7 -> row 9 (2 skipped), row 8 -> 9 (1)
    assert "image file not found" in caplog.text and src._image_names[7] in caplog.text
    rec = pipeline.read_or_replace(src, 7)
    assert rec["row"] == 9 and rec["bad_records"] == 2 and rec["product_index"] == src[9]["product_index"]


def test_a_missing_image_folder_is_an_error_not_an_endless_replacement(reference, tok, tmp_path):
    src = _broken_reference(reference, tmp_path, remove_rows=range(len(
        reference_json.FashionGenJsonSource(reference, "train"))))
    with pytest.raises(pipeline.DataCorrupted, match="consecutive records"):
        next(iter(pipeline.train_dataset(src, stage1(tok), 4, seed=0)))


def test_eval_images_replace_unreadable_with_grey(reference, tmp_path, caplog):
    src = _broken_reference(reference, tmp_path, remove_rows=[2])
    with caplog.at_level(logging.WARNING, logger="fine_jax.data.pipeline"):
        batches = list(pipeline.eval_image_batches(src, 32, 8))
    rows = np.concatenate([b["row"] for b in batches])
    assert rows.tolist() == list(range(len(src)))
    bad = np.concatenate([b["bad_records"] for b in batches])
    assert bad.tolist() == [0, 0, 1] + [0] * (len(src) - 3)
    grey = batches[0]["image"][2]
    assert np.allclose(grey, grey[0, 0]) and "replaced by grey" in caplog.text


def test_training_log_reports_replaced_records(reference, release, tmp_path, capsys):
    from fine_jax import config as config_lib
    from fine_jax import trainer

    _broken_reference(reference, tmp_path, remove_rows=[5])  # one image in the middle of the split
    root = tmp_path / "ref"
    for name in ("vocab.txt", "categorys_to_sign.txt"):
        (root / name).write_bytes((release / name).read_bytes())
    reference_json.write_reference_layout(release / "fashiongen_256_256_validation.h5", root,
                                          "validation")
    c = config_lib.tiny_config(image_size=32, vocab_size=0, embed_dim=32)
    c.data.update(data_dir=str(root), lexicon="none", max_len=40)
    c.loss.queue_size = 32
    c.train.update(global_batch_size=8, max_steps=3, log_every=1, checkpoint_every=100)
    c.eval.update(at_end=False, every_epochs=0)
    trainer.run(c, str(tmp_path / "work"))  # one epoch: 24 rows / 8
    assert "1 unreadable records replaced" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "work" / "metrics.jsonl")]
    assert [r["bad_records"] for r in rows][-1] == 1


def test_auto_workers_one_per_core_on_accelerators_none_on_cpu():
    assert pipeline.resolve_workers(3, "gpu") == 3 and pipeline.resolve_workers(0, "tpu") == 0
    assert pipeline.resolve_workers(-1, "cpu") == 0
    auto = pipeline.resolve_workers(-1, "gpu")
    assert 1 <= auto <= min(pipeline.MAX_AUTO_WORKERS, os.cpu_count())
    cfg = config_lib.load_config_file(pathlib.Path(__file__).parents[1] / "configs" / "fashiongen.py")
    assert cfg.data.num_workers == -1
    config_lib.validate(cfg, num_devices=1)
    cfg.data.num_workers = -2
    with pytest.raises(config_lib.ConfigError, match="data.num_workers=-2"):
        config_lib.validate(cfg, num_devices=1)

"""FashionIQ in its public layout: the TGIR text, the merged training set, per-category validation
with both galleries, the training pipeline, and clear errors for malformed files."""
import json

import numpy as np
import pytest
from PIL import Image

from fine_jax.data import fashioniq, pipeline
from fine_jax.data.image import CorruptImage
from fine_jax.data.text import SYMBOL_TOKENS, Tokenizer, pre_caption

WORDS = ("the difference between two images are and is darker has longer sleeves more "
         "colorful a logo red shorter").split()


def write_fashioniq(root, image_dir="images"):
    """Three categories, train and val, 4 + 3 triplets each; an image split with extra images."""
    rng = np.random.default_rng(0)
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / image_dir).mkdir()
    images = set()
    for c, cat in enumerate(fashioniq.CATEGORIES):
        for split, n in (("train", 4), ("val", 3)):
            entries = [{"target": f"{cat}{split}{k}t", "candidate": f"{cat}{split}{(k + 1) % n}c",
                        "captions": [f"Is darker {k}", f"has longer-sleeves, more colorful {c}"]}
                       for k in range(n)]
            (root / "captions" / f"cap.{cat}.{split}.json").write_text(json.dumps(entries))
            names = [a for e in entries for a in (e["candidate"], e["target"])]
            extra = [f"{cat}{split}extra{k}" for k in range(2)]
            (root / "image_splits" / f"split.{cat}.{split}.json").write_text(json.dumps(extra + names))
            images.update(names + extra)
    for name in sorted(images):
        size = (40, 30) if name.endswith("t") else (24, 36)
        Image.fromarray(rng.integers(0, 256, (*size, 4), dtype=np.uint8), "RGBA").save(
            root / image_dir / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    return write_fashioniq(tmp_path_factory.mktemp("fashioniq"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", *SYMBOL_TOKENS, "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
                               "0", "1", "2"]) + "\n")
    return Tokenizer.from_vocab_file(path)


def test_tgir_text_layout(tok):
    caps = ["Is darker 0", "has longer-sleeves, more colorful 1"]
    assert fashioniq.tgir_text(caps) == pre_caption(
        "the difference between two images are Is darker 0 and has longer-sleeves, more colorful 1")
    assert fashioniq.tgir_text(caps) == ("the difference between two images are is darker 0 and has "
                                         "longer sleeves more colorful 1")
    ids, mask = fashioniq.encode_tgir_text(caps, tok)
    pieces = tok.wordpiece_ids(fashioniq.tgir_text(caps))
    assert ids.shape == (79,) and ids.dtype == np.int32
    assert ids[:len(pieces) + 1].tolist() == [tok.cls_id] + pieces  # [CLS], no [SEP]
    assert tok.sep_id not in ids.tolist() and ids[len(pieces) + 1:].tolist() == [0] * (78 - len(pieces))
    assert mask.sum() == len(pieces) + 1
    short, short_mask = fashioniq.encode_tgir_text(caps, tok, max_len=5)
    assert short.tolist() == [tok.cls_id] + pieces[:4] and short_mask.tolist() == [1] * 5


def test_merged_training_set(fiq_root):
    fiq = fashioniq.FashionIQ(fiq_root)
    merged = fiq.triplets("all", "train")
    assert len(merged) == 12
    assert [t.category for t in merged] == ["dress"] * 4 + ["shirt"] * 4 + ["toptee"] * 4
    # a hand-made cap.train.json (the reference's) takes precedence
    (fiq_root / "captions" / "cap.train.json").write_text(json.dumps(
        [{"target": "a", "candidate": "b", "captions": ["x", "y"]}]))
    try:
        assert [(t.candidate, t.target) for t in fiq.triplets("all", "train")] == [("b", "a")]
    finally:
        (fiq_root / "captions" / "cap.train.json").unlink()


def test_training_source_and_pipeline(fiq_root, tok):
    train = fashioniq.FashionIQ(fiq_root).train_set()
    assert len(train) == 12
    rec = train[0]
    assert rec["reference_image"].shape == (24, 36, 3) and rec["target_image"].shape == (40, 30, 3)
    assert rec["reference_id"] == 0 and rec["target_id"] == 1  # first-appearance numbering
    transform = pipeline.TGIRTransform(tok, pipeline.ImageAugment(32))
    batches = list(pipeline.tgir_dataset(train, transform, 4, seed=0, num_epochs=1))
    assert len(batches) == 3
    b = batches[0]
    assert b["reference_image"].shape == (4, 32, 32, 3) and b["target_image"].shape == (4, 32, 32, 3)
    assert b["input_ids"].shape == (4, 79) and b["attention_mask"].shape == (4, 79)
    assert sorted(np.concatenate([x["idx"] for x in batches]).tolist()) == list(range(12))
    for x in batches:
        for i, ids in zip(x["idx"], x["input_ids"]):
            expected, _ = fashioniq.encode_tgir_text(train.triplets[int(i)].captions, tok)
            np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("category", ["dress", "shirt", "toptee", "all"])
def test_validation_galleries(fiq_root, category):
    fiq = fashioniq.FashionIQ(fiq_root)
    val = fiq.val_set(category, "val")
    triplets = fiq.triplets(category, "val")
    n = 3 if category != "all" else 9
    assert len(val.texts) == n and val.labels.shape == (n, 3)
    assert val.gallery == list(dict.fromkeys(a for t in triplets for a in (t.candidate, t.target)))
    for i, r, t in val.labels:
        assert val.gallery[r] == triplets[i].candidate and val.gallery[t] == triplets[i].target
    split = fiq.val_set(category, "split")
    assert len(split.gallery) == len(val.gallery) + 2 * (3 if category == "all" else 1)
    for i, r, t in split.labels:
        assert split.gallery[r] == triplets[i].candidate and split.gallery[t] == triplets[i].target
    assert split.texts == val.texts


def test_gallery_image_batches(fiq_root):
    fiq = fashioniq.FashionIQ(fiq_root)
    val = fiq.val_set("dress")
    batches = list(pipeline.fashioniq_image_batches(fiq, val.gallery, 32, 4))
    assert sum(len(b["row"]) for b in batches) == len(val.gallery)
    assert batches[0]["image"].shape == (4, 32, 32, 3)


def test_reference_image_folder_name(tmp_path):
    fiq = fashioniq.FashionIQ(write_fashioniq(tmp_path / "fiq", image_dir="tgir_images"))
    assert fiq.image_dir.endswith("tgir_images")
    assert fiq.load_image(fiq.triplets("dress", "val")[0].target).shape == (40, 30, 3)


def test_errors_name_the_file_and_field(fiq_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="FashionIQ folder not found.*captions/cap"):
        fashioniq.FashionIQ(tmp_path / "nowhere")
    (tmp_path / "noimages" / "captions").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="image folder not found.*tgir_images or images"):
        fashioniq.FashionIQ(tmp_path / "noimages")
    root = write_fashioniq(tmp_path / "bad")
    path = root / "captions" / "cap.shirt.val.json"
    entries = json.loads(path.read_text())
    entries[1]["captions"] = "one string"
    path.write_text(json.dumps(entries))
    fiq = fashioniq.FashionIQ(root)
    with pytest.raises(fashioniq.FashionIQError, match=r"cap.shirt.val.json: entry 1 field 'captions'"):
        fiq.triplets("shirt", "val")
    del entries[2]["target"]
    entries[1]["captions"] = ["a", "b"]
    path.write_text(json.dumps(entries))
    with pytest.raises(fashioniq.FashionIQError, match=r"entry 2 has no field 'target'"):
        fiq.triplets("shirt", "val")
    path.write_text("[{")
    with pytest.raises(fashioniq.FashionIQError, match="cap.shirt.val.json is not valid JSON"):
        fiq.triplets("shirt", "val")
    split_path = root / "image_splits" / "split.dress.val.json"
    split_path.write_text(json.dumps(["dressvalextra0"]))
    with pytest.raises(fashioniq.FashionIQError, match="not in the 'split' gallery of dress"):
        fiq.val_set("dress", "split")


def test_missing_training_image_is_replaced(fiq_root, tmp_path, tok):
    root = write_fashioniq(tmp_path / "fiq")
    (root / "images" / "dresstrain2t.png").unlink()
    train = fashioniq.FashionIQ(root).train_set()
    with pytest.raises(CorruptImage, match="dresstrain2t.png"):
        train[2]
    batches = list(pipeline.tgir_dataset(train, pipeline.TGIRTransform(tok, pipeline.ImageAugment(32)),
                                         4, seed=0, num_epochs=1))
    assert np.concatenate([b["bad_records"] for b in batches]).sum() == 1

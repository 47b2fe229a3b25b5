"""The synthetic TGIR set (FashionIQ layout) built from the synthetic catalogue."""
import json
import os

import numpy as np
import pytest

from fine_jax.data import fashioniq as F
from fine_jax.data import synthetic as S
from fine_jax.data.synthetic import tgir as T
from fine_jax.data.text import Tokenizer

TINY = dict(num_train=36, num_validation=18, image_size=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return T.ensure_tgir_dataset(tmp_path_factory.mktemp("tgir") / "fiq", seed=3, **TINY)


@pytest.fixture(scope="module")
def side(tiny):
    return T.load_tgir_products(tiny)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reads_with_the_fashioniq_reader(tiny):
    fiq = F.FashionIQ(tiny)
    assert fiq.image_dir == os.path.join(str(tiny), "images")
    train = fiq.train_set()
    assert len(train) == TINY["num_train"]
    item = train[0]
    assert item["reference_image"].shape == (32, 32, 3) and item["target_image"].dtype == np.uint8
    assert len(item["captions"]) == 2
    manifest = json.loads((tiny / "manifest.json").read_text())
    for cat in F.CATEGORIES:
        assert len(fiq.triplets(cat, "train")) == manifest["counts"]["train"][cat] == TINY["num_train"] // 3
        for gallery in F.GALLERIES:
            v = fiq.val_set(cat, gallery=gallery)
            assert len(v.texts) == TINY["num_validation"] // 3 and v.labels.shape == (len(v.texts), 3)
            assert all(t.startswith("the difference between two images are ") for t in v.texts)
        split = F.load_image_split(os.path.join(tiny, "image_splits", f"split.{cat}.val.json"))
        assert set(fiq.val_set(cat).gallery) == set(split)
        assert not set(split) & set(F.load_image_split(os.path.join(tiny, "image_splits", f"split.{cat}.train.json")))
    assert len(fiq.val_set("all").texts) == TINY["num_validation"]


def test_every_query_word_is_whole_in_the_vocab(tiny):
    tok = Tokenizer.from_vocab_file(tiny / "vocab.txt")
    fiq = F.FashionIQ(tiny)
    for split in F.SPLITS:
        for t in fiq.triplets("all", split):
            text = F.tgir_text(t.captions)
            assert tok.unk_id not in tok.wordpiece_ids(text), text
            assert not any(p.startswith("##") for p in tok.wordpieces(text)), text
            ids, mask = F.encode_tgir_text(t.captions, tok)
            assert ids[0] == tok.cls_id and tok.unk_id not in ids[:mask.sum()]


def test_same_seed_same_bytes(tmp_path):
    small = dict(num_train=6, num_validation=3, image_size=16)
    T.generate_tgir_dataset(tmp_path / "a", seed=5, **small)
    T.generate_tgir_dataset(tmp_path / "b", seed=5, **small)
    T.generate_tgir_dataset(tmp_path / "c", seed=6, **small)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a[T.PRODUCTS_FILE] != c[T.PRODUCTS_FILE]


def test_targets_differ_from_references_and_splits_are_disjoint(tiny, side):
    fiq = F.FashionIQ(tiny)
    products = side["products"]
    for t in side["triplets"]:
        ref, tgt = products[t["candidate"]], products[t["target"]]
        assert ref["split"] == tgt["split"] == t["split"]
        assert (ref["colour"], ref["pattern"], ref["details"]) != (tgt["colour"], tgt["pattern"], tgt["details"])
        assert not np.array_equal(fiq.load_image(t["candidate"]), fiq.load_image(t["target"]))
    signatures = [(p["subcategory"], p["colour"], p["pattern"], frozenset(p["details"])) for p in products.values()]
    assert len(set(signatures)) == len(signatures)  # no image of one product is another's
    bases = {s: {(p["subcategory"], p["colour"], p["pattern"]) for p in products.values()
                 if p["split"] == s and any(t["candidate"] == p["asin"] for t in side["triplets"])} for s in F.SPLITS}
    assert not bases["train"] & bases["val"]  # val references are held out
    for p in products.values():
        assert p["subcategory"] in T.FASHIONIQ_SUBCATEGORIES[p["fashioniq_category"]]


def _applied(ref, edits):
    colour, pattern, details = ref["colour"], ref["pattern"], set(ref["details"])
    for e in edits:
        if e["kind"] == "colour":
            assert e["from"] == ref["colour"] != e["to"]
            colour = e["to"]
        elif e["kind"] == "pattern":
            assert e["from"] == ref["pattern"] != e["to"]
            pattern = e["to"]
        elif e["kind"] == "add":
            assert e["detail"] not in ref["details"]
            details.add(e["detail"])
        else:
            assert e["kind"] == "remove" and e["detail"] in ref["details"]
            details.discard(e["detail"])
    return colour, pattern, details


_PATTERN_WORDS = {"solid": ("solid", "plain", "no pattern"), "stripes": ("stripe",), "checks": ("check",),
                  "dots": ("polka dot",), "colorblock": ("colorblock", "panel")}


def _names(edit, caption):
    if edit["kind"] == "colour":
        return edit["to"] in caption
    if edit["kind"] == "pattern":
        return any(w in caption for w in _PATTERN_WORDS[edit["to"]])
    _, bare = T.DETAIL_PHRASES[edit["detail"]]
    negated = caption.startswith(("has no ", "without ", "no "))
    return bare in caption and negated == (edit["kind"] == "remove")


def test_the_edits_the_captions_name_are_applied(tiny, side):
    products = side["products"]
    captions = {}
    for split in F.SPLITS:
        for cat in F.CATEGORIES:
            for e in json.loads((tiny / "captions" / f"cap.{cat}.{split}.json").read_text()):
                captions[(e["candidate"], e["target"])] = e["captions"]
    assert len(captions) == len(side["triplets"])
    kinds = set()
    for t in side["triplets"]:
        ref, tgt = products[t["candidate"]], products[t["target"]]
        assert captions[(t["candidate"], t["target"])] == t["captions"]
        assert 1 <= len(t["edits"]) <= 2 and len({e["kind"] for e in t["edits"]}) == len(t["edits"])
        colour, pattern, details = _applied(ref, t["edits"])
        assert (tgt["colour"], tgt["pattern"], set(tgt["details"])) == (colour, pattern, details)
        for key in ("subcategory", "fabric", "fashioniq_category", "category"):
            assert tgt[key] == ref[key], key
        c1, c2 = t["captions"]
        if len(t["edits"]) == 1:
            assert c1 != c2 and _names(t["edits"][0], c1) and _names(t["edits"][0], c2), t
        else:
            assert _names(t["edits"][0], c1) and _names(t["edits"][1], c2), t
        kinds.update(e["kind"] for e in t["edits"])
    assert kinds == set(T.EDIT_KINDS)


def test_val_galleries_hold_near_duplicates_of_each_reference():
    products, triplets = T.make_triplets(0)  # default sizes; no drawing
    by_id = {p.product_id: p for p in products}

    def distance(a, b):
        return (a.colour != b.colour) + (a.pattern != b.pattern) + len(set(a.details) ^ set(b.details))

    for cat in F.CATEGORIES:
        val = [t for t in triplets if t["split"] == "val" and t["category"] == cat]
        assert len(val) == T.DEFAULT_NUM_VALIDATION // 3
        gallery = {i for t in val for i in (t["candidate"], t["target"])}
        near = []
        for t in val:
            ref = by_id[t["candidate"]]
            near.append(sum(1 for i in gallery - {t["candidate"], t["target"]}
                            if by_id[i].subcategory == ref.subcategory and distance(by_id[i], ref) <= 2))
        assert min(near) >= 2 and np.median(near) >= 6, (cat, sorted(near))


def test_cache_is_reused_and_a_damaged_one_rebuilt(tmp_path, capsys):
    small = dict(num_train=3, num_validation=3, image_size=16)
    root = T.ensure_tgir_dataset(tmp_path / "fiq", seed=1, **small)
    good = _files(root)
    assert "generating the synthetic TGIR set" in capsys.readouterr().out
    assert T.ensure_tgir_dataset(tmp_path / "fiq", seed=1, **small) == root
    assert capsys.readouterr().out == ""
    png = next((root / "images").iterdir())
    png.write_bytes(png.read_bytes()[:20])  # truncated image
    T.ensure_tgir_dataset(tmp_path / "fiq", seed=1, **small)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "damaged" in out and "images/" in out
    assert _files(root) == good
    (root / "captions" / "cap.shirt.val.json").write_text("[")
    T.ensure_tgir_dataset(tmp_path / "fiq", seed=1, **small)
    assert "cap.shirt.val.json is not valid JSON" in capsys.readouterr().out
    assert _files(root) == good and sorted(p.name for p in tmp_path.iterdir()) == ["fiq"]
    with pytest.raises(ValueError, match="num_train"):
        T.ensure_tgir_dataset(tmp_path / "other", num_train=2)
    fashiongen = S.ensure_dataset(tmp_path / "fg", seed=1, num_train=4, num_validation=2, views=1, image_size=16)
    with pytest.raises(ValueError, match="refusing"):  # another generator's folder is left alone
        T.ensure_tgir_dataset(fashiongen, seed=1, **small)


def test_base_vocab_is_copied_and_keyed(tmp_path, capsys):
    fashiongen = S.ensure_dataset(tmp_path / "fg", seed=1, num_train=4, num_validation=2, views=1, image_size=16)
    small = dict(num_train=3, num_validation=3, image_size=16)
    root = T.ensure_tgir_dataset(tmp_path / "fiq", seed=1, base_vocab=fashiongen / S.VOCAB_FILE, **small)
    assert (root / "vocab.txt").read_bytes() == (fashiongen / S.VOCAB_FILE).read_bytes()
    tok = Tokenizer.from_vocab_file(root / "vocab.txt")
    for t in F.FashionIQ(root).triplets("all", "train"):
        assert tok.unk_id not in tok.wordpiece_ids(F.tgir_text(t.captions))
    capsys.readouterr()
    T.ensure_tgir_dataset(tmp_path / "fiq", seed=1, **small)  # another vocab: rebuilt
    assert "generating" in capsys.readouterr().out
    assert (root / "vocab.txt").read_bytes() != (fashiongen / S.VOCAB_FILE).read_bytes()

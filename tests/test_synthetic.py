"""The embedded synthetic FashionGen set and the FashionGen HDF5 reader/writer."""
import dataclasses
import json
import os
import pathlib
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fine_jax.data import synthetic as S
from fine_jax.data.fashiongen import REQUIRED_FIELDS, FashionGenH5Source, product_runs, write_fashiongen_h5

TINY = dict(num_train=12, num_validation=7, views=2, image_size=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "ds"
    return S.ensure_dataset(root, seed=3, **TINY)


@pytest.fixture(scope="module")
def default_products():
    return S.make_products(0)


def _read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


# ----------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = S.generate_dataset(tmp_path / "a", seed=5, num_train=6, num_validation=4, views=2, image_size=32)
    S.generate_dataset(tmp_path / "b", seed=5, num_train=6, num_validation=4, views=2, image_size=32)
    S.generate_dataset(tmp_path / "c", seed=6, num_train=6, num_validation=4, views=2, image_size=32)
    assert a["seed"] == 5
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for fname in (S.TRAIN_FILE, S.VALIDATION_FILE):
        da, dc = _read_all(tmp_path / "a" / fname), _read_all(tmp_path / "c" / fname)
        assert da["input_image"].shape == dc["input_image"].shape
        assert not np.array_equal(da["input_image"], dc["input_image"])
        assert list(da["input_description"][:, 0]) != list(dc["input_description"][:, 0])


def test_render_is_deterministic_and_views_differ(default_products):
    products, _ = default_products
    p = products[0]
    v0, v0b, v1 = S.render(p, 0, 64, 0), S.render(p, 0, 64, 0), S.render(p, 1, 64, 0)
    assert v0.shape == (64, 64, 3) and v0.dtype == np.uint8
    assert np.array_equal(v0, v0b)
    assert not np.array_equal(v0, v1)


# ----------------------------------------------------------------------------------------------
# HDF5 schema and reader


def test_h5_has_the_fashiongen_schema(tiny):
    n = TINY["num_train"] * TINY["views"]
    s = TINY["image_size"]
    with h5py.File(tiny / S.TRAIN_FILE, "r") as f:
        assert set(f.keys()) == {
            "input_image", "input_description", "input_category", "input_subcategory", "input_composition",
            "input_gender", "input_name", "input_season", "input_brand", "input_concat_description",
            "input_department", "input_pose", "input_productID", "input_msrpUSD", "index", "index_2",
        }
        assert f["input_image"].shape == (n, s, s, 3) and f["input_image"].dtype == np.uint8
        for k in ("input_description", "input_category", "input_subcategory", "input_composition", "input_gender",
                  "input_name", "input_season", "input_brand", "input_concat_description", "input_department",
                  "input_pose"):
            assert f[k].shape == (n, 1), k
            assert f[k].dtype.kind == "S", k
        assert f["input_productID"].shape == (n, 1) and f["input_productID"].dtype == np.int32
        assert f["input_msrpUSD"].shape == (n, 1) and f["input_msrpUSD"].dtype == np.float32
        for k in ("index", "index_2"):
            assert f[k].shape == (n, 1) and f[k].dtype == np.int64
        seasons = {v.decode("latin-1") for v in f["input_season"][:, 0]}
        assert seasons <= set(S.SEASONS)


def test_source_reads_rows_back(tiny):
    src = FashionGenH5Source(tiny / S.TRAIN_FILE)
    products = [p for p in json.loads((tiny / S.PRODUCTS_FILE).read_text()) if p["split"] == "train"]
    views = TINY["views"]
    assert len(src) == len(products) * views
    assert src.num_products == len(products)
    assert [pid for pid, _ in src.productid_list] == [p["product_id"] for p in products]
    assert src.product_first_rows().tolist() == [i * views for i in range(len(products))]
    for r in (0, 1, len(src) - 1):
        item = src[r]
        p = products[r // views]
        assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
        assert item["description"] == p["description"]
        assert (item["category"], item["subcategory"], item["name"]) == (p["category"], p["subcategory"], p["name"])
        assert item["product_id"] == p["product_id"] and item["product_index"] == r // views and item["row"] == r
        assert isinstance(item["season"], str) and item["season"] in S.SEASONS
    assert src[-1]["row"] == len(src) - 1
    with pytest.raises(IndexError):
        src[len(src)]
    per_row = FashionGenH5Source(tiny / S.TRAIN_FILE, text_in_memory=False)
    assert not per_row.text_in_memory and src.text_in_memory
    for r in (0, len(src) - 1):
        a, b = src[r], per_row[r]
        assert np.array_equal(a.pop("image"), b.pop("image")) and a == b
    meta = src.metadata()
    assert meta["product_index"].tolist() == [r // views for r in range(len(src))]
    assert meta["subcategory"] == src.row_subcategory and len(meta["description"]) == len(src)
    assert meta["index_2"].tolist() == [r % views for r in range(len(src))]


def test_product_index_follows_runs_of_product_ids():
    assert product_runs([7, 7, 3, 3, 3, 9, 7]) == [(7, [0, 1]), (3, [2, 3, 4]), (9, [5]), (7, [6])]
    assert product_runs([]) == []


def _row(pid, description="Plain t-shirt in navy.", size=8):
    return dict(image=np.full((size, size, 3), 7, np.uint8), description=description, category="TOPS",
                subcategory="T-SHIRTS", composition="100% cotton", gender="MEN", name="T-Shirt", season="FW2016",
                product_id=pid)


def test_latin1_round_trip(tmp_path):
    path = tmp_path / "x.h5"
    write_fashiongen_h5(path, [_row(5, "Caf\xe9 cr\xe8me t-shirt."), _row(5), _row(2)], 8)
    src = FashionGenH5Source(path)
    assert src[0]["description"] == "Caf\xe9 cr\xe8me t-shirt."
    assert [src[i]["product_index"] for i in range(3)] == [0, 0, 1]
    with h5py.File(path, "r") as f:
        assert f["input_description"][0, 0] == "Caf\xe9 cr\xe8me t-shirt.".encode("latin-1")
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]  # no temporary file left behind
    with pytest.raises(ValueError, match="latin-1"):
        write_fashiongen_h5(tmp_path / "y.h5", [_row(1, "snow \u2603")], 8)
    assert not (tmp_path / "y.h5").exists() and len(list(tmp_path.iterdir())) == 1


def test_source_pickles_without_its_handle(tiny):
    src = FashionGenH5Source(tiny / S.VALIDATION_FILE)
    first = src[0]
    assert src._file is not None
    clone = pickle.loads(pickle.dumps(src))
    assert clone._file is None
    again = clone[0]
    assert np.array_equal(again["image"], first["image"]) and again["description"] == first["description"]
    src.close()


def _read_in_child(src, row, queue):
    queue.put(src[row]["description"])


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork")
def test_source_reopens_after_fork(tiny):
    import multiprocessing

    src = FashionGenH5Source(tiny / S.VALIDATION_FILE)
    expected = src[3]["description"]  # the parent holds an open handle when it forks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(src, 3, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and got == expected
    assert src[3]["description"] == expected  # the parent's handle still works


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.h5"):
        FashionGenH5Source(tmp_path / "nothing_here.h5")


def test_missing_field_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.h5"
    write_fashiongen_h5(path, [_row(1), _row(2)], 8)
    with h5py.File(path, "a") as f:
        del f["input_season"]
    with pytest.raises(ValueError, match=r"broken\.h5.*input_season"):
        FashionGenH5Source(path)
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="junk.h5"):
        FashionGenH5Source(tmp_path / "junk.h5")
    assert "input_image" in REQUIRED_FIELDS


# ----------------------------------------------------------------------------------------------
# products, twins, splits


def test_default_sizes_and_splits(default_products):
    products, twins = default_products
    train = [p for p in products if p.split == "train"]
    val = [p for p in products if p.split == "validation"]
    assert (len(train), len(val)) == (S.DEFAULT_NUM_TRAIN, S.DEFAULT_NUM_VALIDATION)
    assert len({p.product_id for p in products}) == len(products)
    assert len({p.signature for p in products}) == len(products)
    train_bases = {(p.subcategory, p.colour, p.pattern) for p in train}
    assert not train_bases & {(p.subcategory, p.colour, p.pattern) for p in val}
    assert {p.subcategory for p in train} == {s.subcategory for s in S.SUBCATEGORIES}
    assert len(twins["validation"]) >= len(val) // 2


def _check_twins(products, twins):
    by_id = {p.product_id: p for p in products}
    in_pair = set()
    for a_id, b_id, what in twins:
        a, b = by_id[a_id], by_id[b_id]
        in_pair.update((a_id, b_id))
        assert a.split == b.split and a.subcategory == b.subcategory
        assert dataclasses.replace(a, product_id=0, details=()) == dataclasses.replace(b, product_id=0, details=())
        only_a, only_b = set(a.details) - set(b.details), set(b.details) - set(a.details)
        assert len(only_a) + len(only_b) in (1, 2) and len(only_a) <= 1 and len(only_b) <= 1
        assert what == (f"{only_a.pop()} vs {only_b.pop()}" if only_a and only_b else (only_a | only_b).pop())
        sa, sb = a.sentences(), b.sentences()
        diff = set(sa) ^ set(sb)
        assert diff == {S.detail_sentence(a.spec, d) for d in set(a.details) ^ set(b.details)}
        assert [x for x in sa if x not in diff] == [x for x in sb if x not in diff]
    return in_pair


def test_every_product_has_a_twin_differing_in_one_detail(default_products):
    products, twins = default_products
    for split in ("train", "validation"):
        members = [p for p in products if p.split == split]
        assert _check_twins(members, twins[split]) == {p.product_id for p in members}


def test_odd_split_sizes_use_a_triple(tmp_path):
    products, twins = S.make_products(1, num_train=5, num_validation=3)
    for split, n in (("train", 5), ("validation", 3)):
        members = [p for p in products if p.split == split]
        assert len(members) == n
        assert _check_twins(members, twins[split]) == {p.product_id for p in members}
    with pytest.raises(ValueError, match="at least 2"):
        S.make_products(0, num_train=1, num_validation=4)


def test_twin_images_differ_only_locally(default_products):
    products, twins = default_products
    by_id = {p.product_id: p for p in products}
    for a_id, b_id, _ in twins["validation"][:40]:
        for view in range(S.DEFAULT_VIEWS):
            ia = S.render(by_id[a_id], view, 64, 0).astype(int)
            ib = S.render(by_id[b_id], view, 64, 0).astype(int)
            changed = np.abs(ia - ib).max(axis=-1) > 40
            assert 3 <= changed.sum() < 0.2 * changed.size


def test_every_detail_is_visible_in_every_view():
    for si, sub in enumerate(S.SUBCATEGORIES):
        for ci, colour in enumerate(S.COLOURS):
            plain = S.Product(product_id=1, split="train", group=si * 100 + ci, subcategory=sub.subcategory,
                              colour=colour, pattern=S.PATTERNS[(si + ci) % len(S.PATTERNS)], details=(),
                              fabric=sub.fabrics[0], gender="MEN", season="SS2017", brand="X", msrp_usd=1.0)
            for view in ((ci % S.DEFAULT_VIEWS),):
                base = S.render(plain, view, 64, 0).astype(int)
                for d in sub.details:
                    img = S.render(dataclasses.replace(plain, details=(d,)), view, 64, 0).astype(int)
                    changed = (np.abs(img - base).max(axis=-1) > 40).sum()
                    assert changed >= 3, (sub.subcategory, colour, d, view, changed)


def test_items_stay_inside_the_image():
    from fine_jax.data.synthetic import rendering

    for sub in S.SUBCATEGORIES:
        _, _, zoom = S.geometry(sub)["frame"]
        assert zoom <= rendering._MAX_ZOOM
    # largest side <= 0.8 of the image; view scale <= 1.02 and shift <= 0.04 keep it inside
    assert rendering._FRAME_FILL / 2 * 1.02 + 0.04 < 0.5


def test_captions_name_every_visual_attribute(default_products):
    products, _ = default_products
    for p in products[:300]:
        text = p.description.lower()
        assert p.spec.noun in text and p.colour in text
        if p.pattern != "solid":
            assert p.second_colour in text
        for d in p.details:
            assert S.detail_sentence(p.spec, d) in p.description
        assert " left" not in text and " right" not in text
    for sub in S.SUBCATEGORIES:
        sentences = [S.detail_sentence(sub, d) for d in sub.details]
        assert len(set(sentences)) == len(sentences), sub.subcategory


# ----------------------------------------------------------------------------------------------
# category symbols, vocab, lexicon


def test_categories_cover_all_nine_symbols(tiny):
    assert set(S.CATEGORY_SYMBOLS.values()) == set(S.SYMBOL_TOKENS)
    assert {s.category for s in S.SUBCATEGORIES} == set(S.CATEGORY_SYMBOLS)
    for sub in S.SUBCATEGORIES:
        assert 1 <= sum(s.category == sub.category for s in S.SUBCATEGORIES) <= 3
        assert len(sub.details) >= 3
    lines = (tiny / S.CATEGORY_SIGN_FILE).read_text().splitlines()
    table = dict(line.split("\t") for line in lines)
    assert table == {c.lower(): s for c, s in S.CATEGORY_SYMBOLS.items()}


def test_category_symbols_agree_with_the_reference_file(shared_data):
    ref = dict(line.split("\t") for line in (shared_data / "categorys_to_sign.txt").read_text().splitlines() if line)
    for cat, sym in S.CATEGORY_SYMBOLS.items():
        assert ref[cat.lower()] == sym, cat


def test_vocab_layout_and_no_unknown_pieces(tiny):
    vocab = (tiny / S.VOCAB_FILE).read_text(encoding="utf-8").splitlines()
    assert vocab[0] == "[PAD]"
    assert vocab[1:10] == list(S.SYMBOL_TOKENS)
    assert vocab[10:14] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab))
    words = set(vocab)
    for w in ("the", "image", "description", "is", "sub", "category", "spring", "summer", "fall", "winter", "and",
              "composition", "gender", "name", "season", "subcategory", *"0123456789"):
        assert w in words, w
    lexicon = json.loads((tiny / S.LEXICON_FILE).read_text())
    assert set(lexicon) == {"antonyms", "synonyms"}
    for table in lexicon.values():
        for w, cands in table.items():
            assert w in words and all(c in words for c in cands), w

    products, _ = S.make_products(3, TINY["num_train"], TINY["num_validation"])
    texts = [p.description for p in products]
    texts += ["the image description is " + t.lower().replace("-", " ").replace(".", "") for t in texts]
    assert S.count_unknown(tiny / S.VOCAB_FILE, S.vocab_texts(products) + texts) == 0

    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(str(tiny / S.VOCAB_FILE), lowercase=True)
    assert tok.token_to_id("[tops_sign]") == 1 and tok.token_to_id("[MASK]") == 13
    assert tok.encode("Short sleeve cotton t-shirt in navy.", add_special_tokens=False).tokens == [
        "short", "sleeve", "cotton", "t", "-", "shirt", "in", "navy", "."]


def test_vocab_works_with_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    tok = transformers.BertTokenizerFast.from_pretrained(str(tiny))
    products, _ = S.make_products(3, TINY["num_train"], TINY["num_validation"])
    ids = tok([p.description for p in products])["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert tok.unk_token_id == 10 and tok.cls_token_id == 11 and tok.sep_token_id == 12


def test_manifest(tiny):
    m = json.loads((tiny / S.MANIFEST_FILE).read_text())
    assert m["generator"] == S.GENERATOR and m["version"] == S.GENERATOR_VERSION and m["seed"] == 3
    assert m["sizes"] == TINY
    assert m["counts"]["train"] == {"products": 12, "images": 24, "twin_pairs": 6}
    assert m["counts"]["validation"]["products"] == 7
    twins = S.load_twins(tiny, "validation")
    assert twins == [tuple(t) for t in S.make_products(3, 12, 7)[1]["validation"]]


# ----------------------------------------------------------------------------------------------
# cache


def test_ensure_dataset_reuses_and_replaces(tmp_path, capsys):
    small = dict(num_train=4, num_validation=2, views=1, image_size=16)
    root = S.ensure_dataset(tmp_path / "ds", seed=1, **small)
    assert "generating" in capsys.readouterr().out
    stamp = os.stat(root / S.TRAIN_FILE).st_mtime_ns
    assert S.ensure_dataset(tmp_path / "ds", seed=1, **small) == root
    assert capsys.readouterr().out == ""
    assert os.stat(root / S.TRAIN_FILE).st_mtime_ns == stamp

    S.ensure_dataset(tmp_path / "ds", seed=2, **small)  # a stale set is replaced
    assert json.loads((root / S.MANIFEST_FILE).read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary directories left

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        S.ensure_dataset(other, seed=1, **small)
    assert (other / "notes.txt").read_text() == "keep me"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _corrupt_manifest(path):
    path.write_text('{"generator": "fine_jax.data.synth')


def _drop_twins(path):
    path.write_text("[]\n")


@pytest.mark.parametrize("damage", [(S.TRAIN_FILE, _truncate), (S.VALIDATION_FILE, os.remove),
                                    (S.MANIFEST_FILE, _corrupt_manifest), (S.TWINS_FILE.format(split="train"),
                                                                           _drop_twins)])
def test_ensure_dataset_regenerates_a_damaged_cache(tmp_path, capsys, damage):
    small = dict(num_train=4, num_validation=2, views=1, image_size=16)
    root = S.ensure_dataset(tmp_path / "ds", seed=1, **small)
    good = {p.name: p.read_bytes() for p in root.iterdir()}
    capsys.readouterr()
    name, damage_fn = damage
    damage_fn(root / name)
    assert S.ensure_dataset(tmp_path / "ds", seed=1, **small) == root
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "damaged" in out and "regenerating" in out and name in out, out
    assert {p.name: p.read_bytes() for p in root.iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # replaced in place, nothing left over
    assert S.ensure_dataset(tmp_path / "ds", seed=1, **small) == root
    assert capsys.readouterr().out == ""


def test_ensure_dataset_keeps_refusing_foreign_folders_with_a_broken_manifest(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / S.MANIFEST_FILE).write_text("not json")
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        S.ensure_dataset(root, seed=1, num_train=4, num_validation=2, views=1, image_size=16)
    assert (root / "notes.txt").read_text() == "keep me"


def test_concurrent_ensure_dataset_one_wins(tmp_path):
    code = ("import sys; from fine_jax.data import synthetic as S; "
            "S.ensure_dataset(sys.argv[1], seed=4, num_train=4, num_validation=2, views=1, image_size=16)")
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ds")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert json.loads((tmp_path / "ds" / S.MANIFEST_FILE).read_text())["seed"] == 4
    assert len(FashionGenH5Source(tmp_path / "ds" / S.TRAIN_FILE)) == 4


def test_files_load_with_the_project_text_module(tiny):
    from fine_jax.data import text as T

    tok = T.Tokenizer.from_vocab_file(tiny / S.VOCAB_FILE)
    products, _ = S.make_products(3, TINY["num_train"], TINY["num_validation"])
    for p in products:
        for t in (T.eval_text(p.description), p.name, p.composition, p.subcategory.replace("&", "and"),
                  T.parse_season(p.season)):
            assert tok.unk_id not in tok.wordpiece_ids(t), t
    assert T.load_category_symbols(tiny / S.CATEGORY_SIGN_FILE)["jackets & coats"] == "[coats_sign]"
    assert T.Lexicon.from_json(tiny / S.LEXICON_FILE).antonyms("black") == ["white"]

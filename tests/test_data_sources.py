"""FashionGen in its three forms (release HDF5, the reference JSON layout, the prepared ArrayRecord
dataset): the same records from each, the prepare CLI, format detection, grain worker processes,
and one clear error for each kind of bad input."""
import gzip
import json
import os
import pathlib
import subprocess
import sys

import grain
import h5py
import numpy as np
import pytest

from fine_jax import config as config_lib
from fine_jax import datasets
from fine_jax.data import arrayrecord, prepare, reference_json
from fine_jax.data.fashiongen import TEXT_FIELDS, FashionGenH5Source, write_fashiongen_h5
from fine_jax.data.image import CorruptImage

REPO = pathlib.Path(__file__).resolve().parents[1]
CATEGORIES = [("TOPS", "T-SHIRTS"), ("JACKETS & COATS", "DENIM JACKETS"), ("PANTS", "JEANS"),
              ("SNEAKERS", "LOW TOP SNEAKERS")]
TABLES = {"tops": "[tops_sign]", "jackets & coats": "[coats_sign]", "pants": "[pants_sign]",
          "sneakers": "[shoes_sign]"}


def make_rows(num_products, first_id, size=32, seed=0):
    """Rows in the release's field set; products with 1-3 views, latin-1 text, both seasons."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(num_products):
        category, subcategory = CATEGORIES[p % len(CATEGORIES)]
        for view in range(1 + p % 3):
            rows.append(dict(
                image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                description=f"Slim-fit cotton tee {p} in crème. Zip-closure at back. Tonal stitching.",
                category=category, subcategory=subcategory, composition="100% cotton.",
                gender="Men" if p % 2 else "Women", name=f"Logo Tee N°{p}",
                season="SS2017" if p % 2 else "FW2016", product_id=first_id + p,
                brand="MAISON", pose=f"id_gridfs_{view + 1}", msrp_usd=120.0 + p))
    return rows


def write_release(directory, n_train=9, n_val=6, size=32):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_fashiongen_h5(directory / "fashiongen_256_256_train.h5", make_rows(n_train, 100, size, 1), size)
    write_fashiongen_h5(directory / "fashiongen_256_256_validation.h5", make_rows(n_val, 900, size, 2),
                        size)
    (directory / "categorys_to_sign.txt").write_text("".join(f"{k}\t{v}\n" for k, v in TABLES.items()))
    from fine_jax.data.text import SYMBOL_TOKENS
    vocab = ["[PAD]", *SYMBOL_TOKENS, "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "image", "is"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def reference(release, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    for split, name in (("train", "fashiongen_256_256_train.h5"),
                        ("validation", "fashiongen_256_256_validation.h5")):
        reference_json.write_reference_layout(release / name, root, split, category_symbols=TABLES)
    for name in ("vocab.txt", "categorys_to_sign.txt"):
        (root / name).write_bytes((release / name).read_bytes())
    return root


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    args = prepare.parse_args([f"--input={release}", f"--output={out}", "--rows_per_shard=4"])
    prepare.run(args, log=lambda _: None)
    return out


def assert_same_records(a, b):
    assert len(a) == len(b) and a.num_products == b.num_products
    def products(s):
        return [(int(p), list(r)) for p, r in s.productid_list]

    assert products(a) == products(b)
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert ra.keys() == rb.keys()
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert {k: v for k, v in ra.items() if k != "image"} == {k: v for k, v in rb.items() if k != "image"}
    ma, mb = a.metadata(), b.metadata()
    for key in ("row", "product_id", "product_index", *TEXT_FIELDS, "index", "index_2"):
        np.testing.assert_array_equal(np.asarray(ma[key]), np.asarray(mb[key]), err_msg=key)
    np.testing.assert_array_equal(a.product_first_rows(), b.product_first_rows())


# ----------------------------------------------------------------------------------------------
# The HDF5 schema and the reference JSON layout


def test_release_schema_field_names_and_dtypes(release):
    with h5py.File(release / "fashiongen_256_256_validation.h5", "r") as f:
        assert f["input_image"].dtype == np.uint8 and f["input_image"].shape[1:] == (32, 32, 3)
        for field in TEXT_FIELDS.values():
            assert f[field].dtype.kind == "S" and f[field].shape[1:] == (1,), field
        assert f["input_productID"].dtype.kind == "i" and f["input_productID"].shape[1:] == (1,)
        assert f["input_msrpUSD"].dtype.kind == "f"


def test_reference_prepare_outputs(release, reference):
    info = json.loads((reference / "validation" / "info_data.json").read_text(encoding="utf-8"))
    products = json.loads((reference / "validation" / "productid_list.json").read_text())
    # prepare_dataset.py: every h5 key but the image, index_2 last, latin-1 text as str
    assert list(info[0])[-1] == "index_2" and "input_image" not in info[0]
    assert info[0]["input_description"].startswith("Slim-fit cotton tee 0 in crème.")
    assert isinstance(info[0]["input_productID"], int) and isinstance(info[0]["input_msrpUSD"], float)
    assert products[:3] == [[900, [0]], [901, [1, 2]], [902, [3, 4, 5]]]
    annotation = json.loads((reference / "annotation" / "fashiongen_val.json").read_text())
    # the shipped plain annotation holds the bytes repr of the description: "crème" -> "cr\\xe8me"
    assert annotation[1] == {"caption": info[1]["input_description"].replace("è", "\\xe8"),
                             "image": ["901_0.png", "901_1.png"]}
    symbol = json.loads((reference / "annotation" / "fashiongen_val_symbol.json").read_text())
    assert [e["caption"].split(" ", 1)[0] for e in symbol[:4]] == [
        "tops_sign", "coats_sign", "pants_sign", "shoes_sign"]
    assert symbol[1]["caption"] == "coats_sign " + info[1]["input_description"]
    assert (reference / "images" / "901_1.png").is_file()


def test_reference_layout_gives_the_h5_records(release, reference):
    for split, name in (("train", "fashiongen_256_256_train.h5"),
                        ("validation", "fashiongen_256_256_validation.h5")):
        assert_same_records(FashionGenH5Source(release / name),
                            reference_json.FashionGenJsonSource(reference, split))


def test_reference_layout_accepts_the_test_annotation_name(reference, tmp_path):
    root = tmp_path / "ref"
    (root / "annotation").mkdir(parents=True)
    for sub in ("validation", "images"):
        os.symlink(reference / sub, root / sub)
    (root / "annotation" / "fashiongen_test.json").write_bytes(
        (reference / "annotation" / "fashiongen_val.json").read_bytes())
    assert len(reference_json.FashionGenJsonSource(root, "validation")) == 12


# ----------------------------------------------------------------------------------------------
# ArrayRecord (tfds)


def test_prepared_dataset_gives_the_h5_records(release, prepared):
    for split, name in (("train", "fashiongen_256_256_train.h5"),
                        ("validation", "fashiongen_256_256_validation.h5")):
        ar = arrayrecord.FashionGenArrayRecordSource(prepared, split)
        assert_same_records(FashionGenH5Source(release / name), ar)
    ar = arrayrecord.FashionGenArrayRecordSource(prepared, "validation")
    assert ar.categories == {"TOPS": [0, 4], "JACKETS & COATS": [1, 5], "PANTS": [2], "SNEAKERS": [3]}
    assert ar.subcategories["DENIM JACKETS"] == [1, 5]
    shards = sorted(p.name for p in (prepared / "fashiongen" / "1.0.0").glob("*validation.array_record*"))
    assert shards == [f"fashiongen-validation.array_record-0000{k}-of-00003" for k in range(3)]
    assert (prepared / "vocab.txt").is_file() and (prepared / "categorys_to_sign.txt").is_file()


def test_prepared_dataset_reads_with_tfds_data_source(release, prepared):
    tfds = pytest.importorskip("tensorflow_datasets")
    ds = tfds.data_source("fashiongen", data_dir=str(prepared), split="validation")
    h5 = FashionGenH5Source(release / "fashiongen_256_256_validation.h5")
    assert len(ds) == len(h5)
    ex = ds[4]
    np.testing.assert_array_equal(ex["image"], h5[4]["image"])
    assert ex["description"].decode() == h5[4]["description"]
    assert int(ex["product_index"]) == h5[4]["product_index"]
    assert "tensorflow" not in sys.modules


def test_png_encoding_and_parallel_writers_give_the_same_pixels(reference, tmp_path):
    # Worker processes are spawned, so run the CLI as a program.
    proc = subprocess.run(
        [sys.executable, "-m", "fine_jax.data.prepare", f"--input={reference}",
         f"--output={tmp_path / 'png'}", "--image_encoding=png", "--num_workers=2",
         "--rows_per_shard=5", "--splits=validation"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "validation: 12 rows, 6 products, 4 categories, 4 subcategories" in proc.stdout
    assert_same_records(reference_json.FashionGenJsonSource(reference, "validation"),
                        arrayrecord.FashionGenArrayRecordSource(tmp_path / "png", "validation"))


def test_prepare_errors_are_one_message(tmp_path, release, prepared, capsys):
    assert prepare.main([f"--input={tmp_path / 'nowhere'}", f"--output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "fashiongen_256_256_train.h5" in err and "info_data.json" in err
    (tmp_path / "empty").mkdir()
    assert prepare.main([f"--input={tmp_path / 'empty'}", f"--output={tmp_path / 'o'}"]) == 2
    assert "found neither" in capsys.readouterr().err
    assert prepare.main([f"--input={release}", f"--output={prepared}"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interrupted_prepare_leaves_no_dataset(release, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(arrayrecord, "_index", boom)
    with pytest.raises(KeyboardInterrupt):
        arrayrecord.write_dataset({"validation": FashionGenH5Source(
            release / "fashiongen_256_256_validation.h5")}, tmp_path / "out", log=lambda _: None)
    assert arrayrecord.find_dataset_dir(tmp_path / "out") is None
    assert not any(p.name.startswith(".") for p in (tmp_path / "out" / "fashiongen").iterdir())


# ----------------------------------------------------------------------------------------------
# datasets.resolve: format detection and errors


def _cfg(data_dir, fmt="auto"):
    c = config_lib.base_config()
    c.data.data_dir = str(data_dir)
    c.data.format = fmt
    c.data.lexicon = "none"
    return c


@pytest.mark.parametrize("form, expected", [("release", "h5"), ("reference", "reference_json"),
                                            ("prepared", "arrayrecord")])
def test_resolve_detects_each_form(form, expected, request):
    root = request.getfixturevalue(form)
    data = datasets.resolve(_cfg(root))
    assert data.format == expected
    assert len(data.train) == 18 and len(data.eval) == 12 and data.eval.num_products == 6
    assert data.tokenizer.cls_id == 11 and data.category_symbols["tops"] == "[tops_sign]"
    assert datasets.resolve(_cfg(root, expected)).format == expected


def test_resolve_missing_path_says_what_is_expected(tmp_path):
    with pytest.raises(datasets.DatasetMissing) as e:
        datasets.resolve(_cfg(tmp_path / "nowhere"))
    msg = str(e.value)
    for expected in ("does not exist", "fashiongen_256_256_train.h5", "info_data.json",
                     "python -m fine_jax.data.prepare", "vocab.txt", "--config.data.data_dir"):
        assert expected in msg


def test_resolve_wrong_explicit_format(release):
    with pytest.raises(datasets.DatasetMissing, match="info_data.json"):
        datasets.resolve(_cfg(release, "reference_json"))


def test_resolve_wordnet_missing_is_a_dataset_error(release, monkeypatch, tmp_path):
    from fine_jax.data import wordnet

    monkeypatch.setattr(wordnet, "DEFAULT_DIRS", ())
    monkeypatch.delenv(wordnet.WORDNET_ENV, raising=False)
    cfg = _cfg(release)
    cfg.data.lexicon = "wordnet"
    with pytest.raises(datasets.DatasetMissing, match="apt-get install wordnet-base"):
        datasets.resolve(cfg)


# ----------------------------------------------------------------------------------------------
# Malformed files: one clear error naming the file and the field


def _copy_reference(reference, tmp_path):
    import shutil

    root = tmp_path / "ref"
    shutil.copytree(reference, root)
    return root


def test_malformed_info_json(reference, tmp_path):
    root = _copy_reference(reference, tmp_path)
    info_path = root / "validation" / "info_data.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    del info[3]["input_category"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(reference_json.LayoutError,
                       match=r"info_data.json: entry 3 has no field 'input_category'"):
        reference_json.FashionGenJsonSource(root, "validation")
    info_path.write_text("[{" + json.dumps(info)[2:-10])
    with pytest.raises(datasets.DatasetInvalid, match=r"validation/info_data.json is not valid JSON"):
        datasets.resolve(_cfg(root))


def test_inconsistent_product_list_and_annotation(reference, tmp_path):
    root = _copy_reference(reference, tmp_path)
    products_path = root / "validation" / "productid_list.json"
    products = json.loads(products_path.read_text())
    products[1][0] = 12345
    products_path.write_text(json.dumps(products))
    with pytest.raises(reference_json.LayoutError, match="entry 1 .product 12345. lists row 1"):
        reference_json.FashionGenJsonSource(root, "validation")
    products[1][0] = 901
    products_path.write_text(json.dumps(products))
    ann_path = root / "annotation" / "fashiongen_val.json"
    ann = json.loads(ann_path.read_text())
    ann[2]["image"].pop()
    ann_path.write_text(json.dumps(ann))
    with pytest.raises(reference_json.LayoutError, match="entry 2 lists 2 images but product 902 has 3"):
        reference_json.FashionGenJsonSource(root, "validation")


def test_h5_missing_field_and_not_hdf5(tmp_path):
    bad = tmp_path / "fashiongen_256_256_validation.h5"
    write_fashiongen_h5(bad, make_rows(2, 1), 32)
    with h5py.File(bad, "a") as f:
        del f["input_season"]
    with pytest.raises(ValueError, match="missing field.*input_season"):
        FashionGenH5Source(bad)
    bad.write_text("not hdf5")
    with pytest.raises(ValueError, match="is not a readable HDF5 file"):
        FashionGenH5Source(bad)


def test_arrayrecord_index_errors(prepared, tmp_path):
    import shutil

    root = tmp_path / "ar"
    shutil.copytree(prepared, root)
    index = root / "fashiongen" / "1.0.0" / "fine_jax_index-validation.json.gz"
    index.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="fine_jax_index-validation.json.gz is not a readable gzip JSON"):
        arrayrecord.FashionGenArrayRecordSource(root, "validation")
    with gzip.open(index, "wt") as f:
        json.dump({"format": arrayrecord.INDEX_FORMAT, "num_rows": 12}, f)
    with pytest.raises(ValueError, match="missing field 'productid_list'"):
        arrayrecord.FashionGenArrayRecordSource(root, "validation")
    with pytest.raises(KeyError, match="no split 'test'"):
        arrayrecord.FashionGenArrayRecordSource(root, "test")


# ----------------------------------------------------------------------------------------------
# Corrupt / missing images are per record


def test_missing_and_corrupt_png_raise_corrupt_image_for_that_row_only(reference, tmp_path):
    root = _copy_reference(reference, tmp_path)
    src = reference_json.FashionGenJsonSource(root, "validation")
    os.remove(src.image_path(3))
    pathlib.Path(src.image_path(5)).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CorruptImage, match="not found"):
        src[3]
    with pytest.raises(CorruptImage, match="cannot be decoded"):
        src[5]
    assert src[4]["row"] == 4


def test_damaged_h5_chunk_is_corrupt_image(tmp_path):
    path = tmp_path / "f.h5"
    write_fashiongen_h5(path, make_rows(3, 1), 32, compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["input_image"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    src = FashionGenH5Source(path)
    with pytest.raises(CorruptImage, match="input_image row 1"):
        src[1]
    assert src[0]["row"] == 0 and src[2]["row"] == 2


# ----------------------------------------------------------------------------------------------
# grain worker processes


class _ImageSum:
    def __call__(self, record):
        return {"row": np.int64(record["row"]), "pixel_sum": np.int64(record["image"].sum()),
                "product_index": np.int64(record["product_index"])}


@pytest.fixture
def absl_flags_parsed():
    """grain's worker processes read absl flags, which a program parses in app.run."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.mark.parametrize("form", ["release", "reference", "prepared"])
def test_sources_in_grain_worker_processes(form, request, absl_flags_parsed):
    root = request.getfixturevalue(form)
    data = datasets.resolve(_cfg(root))
    src = data.eval
    ds = grain.MapDataset.source(src).map(_ImageSum()).to_iter_dataset()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2))
    got = sorted((int(x["row"]), int(x["pixel_sum"]), int(x["product_index"])) for x in ds)
    expected = [(i, int(src[i]["image"].sum()), src[i]["product_index"]) for i in range(len(src))]
    assert got == expected



_MANY_FIRST_READS = """
import pickle, sys, threading

assert "tensorflow_datasets" not in sys.modules
src = pickle.loads(sys.stdin.buffer.read())  # as a grain worker process receives it
# Imported by the unpickling, in this thread, before any reader thread exists.
print("IMPORTED", "tensorflow_datasets" in sys.modules)
n = 12
start, sums = threading.Barrier(n), [None] * n

def read(i):
    start.wait()  # every thread's first read at the same moment
    sums[i] = int(src[i % len(src)]["image"].sum())

threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=60)
print("READ", sum(s is not None for s in sums), sums == [int(src[i % len(src)]["image"].sum())
                                                      for i in range(n)])
"""


def test_many_threads_reading_a_fresh_worker_copy_at_once_do_not_deadlock(prepared):
    """grain's prefetch threads in a worker process all read their first record at once. Their
    concurrent first imports of tensorflow_datasets could deadlock and leave the worker (and the
    training job) waiting forever; the unpickled source has imported it before they start."""
    import pickle

    src = datasets.resolve(_cfg(prepared)).eval
    proc = subprocess.run([sys.executable, "-c", _MANY_FIRST_READS], input=pickle.dumps(src),
                          capture_output=True, timeout=240)
    out, err = proc.stdout.decode(), proc.stderr.decode()[-2000:]
    assert proc.returncode == 0, err
    assert "IMPORTED True" in out and "READ 12 True" in out, (out, err)

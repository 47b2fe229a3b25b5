"""Checks against the real reference files in ../shared/data (skipped when the folder is absent):
301 real FashionGen validation products in the reference annotation layout, read through the
reference-layout source and encoded in the evaluation layout, give exactly the ids of
transformers' BertTokenizer on the reference vocab; the _symbol annotation agrees with it."""
import json

import numpy as np
import pytest
from PIL import Image

from fine_jax.data import pipeline, reference_json, samplers
from fine_jax.data.text import load_category_symbols, pre_caption


@pytest.fixture
def sample(shared_data):
    return json.loads((shared_data / "fashiongen_val_sample.json").read_text(encoding="utf-8"))


def reference_layout_from_annotation(root, entries):
    """The reference layout of the validation split around real annotation entries: the captions
    become the rows' descriptions, the product id is the number in the image names."""
    info, products, row = [], [], 0
    for entry in entries:
        pid = int(entry["image"][0].split("_")[0])
        rows = list(range(row, row + len(entry["image"])))
        products.append([pid, rows])
        for k in rows:
            info.append({"index": k, "input_category": "TOPS", "input_composition": "",
                         "input_description": entry["caption"], "input_gender": "Men",
                         "input_name": "", "input_productID": pid, "input_season": "SS2017",
                         "input_subcategory": "SHIRTS", "index_2": k})
        row += len(rows)
    (root / "validation").mkdir(parents=True)
    (root / "validation" / "info_data.json").write_text(json.dumps(info, ensure_ascii=False))
    (root / "validation" / "productid_list.json").write_text(json.dumps(products))
    (root / "annotation").mkdir()
    (root / "annotation" / "fashiongen_val.json").write_text(json.dumps(entries, ensure_ascii=False))
    (root / "images").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / entries[0]["image"][0])


def test_real_captions_through_the_reference_layout_match_bert_tokenizer(shared_data, ref_tok,
                                                                         hf_tok, tmp_path):
    # the _symbol file has the descriptions as they are in the release (and in info_data.json)
    sample = [{"caption": e["caption"].split(" ", 1)[1], "image": e["image"]} for e in json.loads(
        (shared_data / "fashiongen_val_symbol_sample.json").read_text(encoding="utf-8"))]
    assert len(sample) == 301
    reference_layout_from_annotation(tmp_path, sample)
    source = reference_json.FashionGenJsonSource(tmp_path, "validation")
    assert source.num_products == 301 and len(source) == sum(len(e["image"]) for e in sample)
    ev = samplers.eval_set(source)
    assert ev.descriptions == [e["caption"] for e in sample]
    ours = pipeline.eval_texts(ev.descriptions, ref_tok, 180)
    texts = ["the image description is " + pre_caption(c) for c in ev.descriptions]
    hf = hf_tok(texts, padding="max_length", truncation=True, max_length=180)
    np.testing.assert_array_equal(ours["input_ids"], np.asarray(hf["input_ids"]))
    np.testing.assert_array_equal(ours["attention_mask"], np.asarray(hf["attention_mask"]))
    assert source[0]["image"].shape == (8, 8, 3)


def test_symbol_annotation_agrees_with_the_plain_one_and_the_category_table(shared_data, sample,
                                                                           ref_tok):
    symbols = json.loads((shared_data / "fashiongen_val_symbol_sample.json").read_text(encoding="utf-8"))
    table = load_category_symbols(shared_data / "categorys_to_sign.txt")
    words = {s[1:-1] for s in table.values()}
    counts = {}
    assert len(symbols) == len(sample)
    for plain, sym in zip(sample, symbols):
        word, caption = sym["caption"].split(" ", 1)
        # the plain file holds the bytes repr of the description (36 of these 301 differ)
        assert reference_json.annotation_caption(caption) == plain["caption"]
        assert sym["image"] == plain["image"]
        assert word in words
        # the bracketed symbol is one token, at the reference vocab's ids 1-9
        assert ref_tok.wordpiece_ids(f"[{word}]") == [ref_tok.symbol_ids[f"[{word}]"]]
        assert 1 <= ref_tok.symbol_ids[f"[{word}]"] <= 9
        counts[word] = counts.get(word, 0) + 1
    # every 25th product of the validation split: the split's category distribution (method_spec
    # §4.1: tops 3133, pants 1352, coats 1000, ... of 7,519) shows through
    assert max(counts, key=counts.get) == "tops_sign"
    assert abs(counts["tops_sign"] - 3133 / 25) < 20 and abs(counts["pants_sign"] - 1352 / 25) < 12

"""Tests for fine_jax.data.text: normalisation, tokenizer parity with HF, stage-1/2 and eval texts."""
import collections
import json
import pickle

import numpy as np
import pytest

from fine_jax.data.text import (
    SYMBOL_TOKENS,
    Lexicon,
    Tokenizer,
    build_stage1_text,
    build_stage2_text,
    encode_eval,
    encode_eval_caption,
    eval_text,
    load_category_symbols,
    parse_season,
    pre_caption,
)

# ------------------------------------------------------------------------------------------------
# A small handmade vocab: [PAD]=0, symbols 1-9, [UNK]=10, [CLS]=11, [SEP]=12, [MASK]=13.
# ------------------------------------------------------------------------------------------------

N_WORDS = 80
WORDS = [f"w{i}" for i in range(N_WORDS)]
EXTRA = (
    "the image description is category sub composition gender name season spring summer fall winter "
    "2017 2016 and tops shirts t - % 100 cotton men women black logo opp guys jacket coats"
).split()
SMALL_VOCAB = ["[PAD]", *SYMBOL_TOKENS, "[UNK]", "[CLS]", "[SEP]", "[MASK]", *EXTRA, *WORDS, "##s", "_"]

CATEGORY_SYMBOLS = {"tops": "[tops_sign]", "jackets & coats": "[coats_sign]"}


@pytest.fixture
def small_tok(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SMALL_VOCAB) + "\n", encoding="utf-8")
    return Tokenizer.from_vocab_file(path)


def make_record(n_words=70, **kw):
    rec = dict(
        description=" ".join(WORDS[:n_words]),
        category="Tops",
        subcategory="T-Shirts",
        composition="100% Cotton",
        gender="Men",
        name="Black Logo Jacket & Coats",
        season="SS2017",
    )
    rec.update(kw)
    return rec


def stage1(tok, rec=None, seed=0, max_len=180, lexicon=None, fix=False):
    return build_stage1_text(
        rec or make_record(),
        tok,
        CATEGORY_SYMBOLS,
        lexicon or Lexicon.empty(),
        np.random.default_rng(seed),
        max_len,
        fix_mlm_labels=fix,
    )


# ------------------------------------------------------------------------------------------------
# Normalisation helpers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Slim-fit Jeans in Black.", "slim fit jeans in black"),
        ("Tonal stitching. Zip-closure.", "tonal stitching zip closure"),
        ("A, b. c' d! e\" f( g) h* i# j: k; l~ m", "a b c d e f g h i j k l m"),
        ("What? yes?", "what? yes?"),
        ("black/white", "black white"),
        ("<person> wears it<br>well", "person wears it well"),
        ("  lots   of    space  ", "lots of space"),
        ("Hem - cuffs", "hem cuffs"),
        ("", ""),
        # Only runs of two or more whitespace characters collapse, as in the reference.
        ("a\tb", "a\tb"),
        ("a \t b\n\n", "a b"),
    ],
)
def test_pre_caption(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_has_no_word_limit():
    raw = " ".join(["word"] * 500)
    assert pre_caption(raw) == raw


def test_eval_text_prepends_prompt_after_normalising():
    assert eval_text("Slim-fit Jeans.") == "the image description is slim fit jeans"
    assert eval_text("") == "the image description is "


def test_parse_season():
    assert parse_season("SS2017") == "spring summer 2017"
    assert parse_season("FW2016") == "fall winter 2016"
    for bad in ("SS17", "XX2017", "ss2017", "SS20170", ""):
        with pytest.raises(ValueError, match="season"):
            parse_season(bad)


def test_load_category_symbols(tmp_path):
    good = tmp_path / "cats.txt"
    good.write_text("tops\t[tops_sign]\njackets & coats\t[coats_sign]\n\n", encoding="utf-8")
    assert load_category_symbols(good) == CATEGORY_SYMBOLS

    bad = tmp_path / "bad.txt"
    bad.write_text("tops\t[tops_sign]\npants [pants_sign]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        load_category_symbols(bad)

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_category_symbols(tmp_path / "missing.txt")


def test_lexicon(tmp_path):
    lex = Lexicon({"Black": ["white", "white"]}, {"men": ["guys", "guys", "male"]})
    assert lex.antonyms("black") == ["white", "white"]  # duplicates kept: they weight the draw
    assert lex.antonyms("BLACK") == ["white", "white"]
    assert lex.antonyms("red") == []
    assert lex.synonyms("Men") == ["guys", "male"]  # a set in the reference: uniform over names
    assert Lexicon.empty().antonyms("black") == [] and Lexicon.empty().synonyms("black") == []

    path = tmp_path / "lex.json"
    path.write_text(json.dumps({"antonyms": {"up": ["down"]}, "synonyms": {"big": ["large"]}}))
    lex = Lexicon.from_json(path)
    assert lex.antonyms("up") == ["down"] and lex.synonyms("big") == ["large"]
    assert pickle.loads(pickle.dumps(lex)).antonyms("up") == ["down"]
    with pytest.raises(ValueError):
        Lexicon({"up": "down"})


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def test_tokenizer_ids_are_looked_up(small_tok):
    tok = small_tok
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 10, 11, 12, 13)
    assert tok.vocab_size == len(SMALL_VOCAB) == len(tok)
    assert tok.symbol_ids == {s: i + 1 for i, s in enumerate(SYMBOL_TOKENS)}
    assert tok.token_to_id("the") == SMALL_VOCAB.index("the")
    assert tok.token_to_id("not_a_token") == tok.unk_id
    assert tok.id_to_token(tok.mask_id) == "[MASK]"
    with pytest.raises(KeyError):
        tok.id_to_token(tok.vocab_size)


def test_tokenizer_wordpiece(small_tok):
    tok = small_tok
    ids = tok.wordpiece_ids("The W1s [coats_sign]w2 unknownword [MASK]")
    assert [tok.id_to_token(i) for i in ids] == ["the", "w1", "##s", "[coats_sign]", "w2", "[UNK]", "[MASK]"]
    assert tok.decode(tok.wordpiece_ids("the w1s")) == "the w1s"


def test_tokenizer_pickles(small_tok):
    small_tok.wordpiece_ids("warm the backend")
    clone = pickle.loads(pickle.dumps(small_tok))
    assert clone._backend is None
    assert clone.wordpiece_ids("the image w3s") == small_tok.wordpiece_ids("the image w3s")
    assert clone.mask_id == small_tok.mask_id


def test_tokenizer_rejects_vocab_without_symbols(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match="tops_sign"):
        Tokenizer.from_vocab_file(path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_vocab_file(tmp_path / "nope.txt")


def test_encode_eval(small_tok):
    tok = small_tok
    ids, mask = encode_eval(tok, "the image w1 w2", 8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.tolist() == [tok.cls_id] + tok.wordpiece_ids("the image w1 w2") + [tok.sep_id, 0, 0]
    assert mask.tolist() == [1] * 6 + [0] * 2
    ids, mask = encode_eval(tok, " ".join(WORDS[:20]), 6)
    assert ids.tolist() == [tok.cls_id] + tok.wordpiece_ids("w0 w1 w2 w3") + [tok.sep_id]
    assert mask.tolist() == [1] * 6
    ids2, _ = encode_eval_caption(tok, "W1-W2.", 10)
    prompted = tok.wordpiece_ids("the image description is w1 w2")
    assert ids2.tolist()[:8] == [tok.cls_id] + prompted + [tok.sep_id]


def test_build_stage2_text(small_tok):
    tok = small_tok
    ids, mask = build_stage2_text("W1-W2.", tok, 10)
    body = tok.wordpiece_ids("the image description is w1 w2")
    assert ids.tolist() == [tok.cls_id] + body + [0] * (9 - len(body))  # no [SEP]
    assert mask.tolist() == [1] * (1 + len(body)) + [0] * (9 - len(body))
    ids, mask = build_stage2_text(" ".join(WORDS), tok, 12)
    assert ids[0] == tok.cls_id and tok.sep_id not in ids.tolist() and mask.sum() == 12


# ------------------------------------------------------------------------------------------------
# Stage 1
# ------------------------------------------------------------------------------------------------


def _layout(tok, n):
    prompt = tok.wordpiece_ids("the image description is")
    d0 = 2 + len(prompt)
    return prompt, d0, d0 + n  # description span [d0, d0 + n), [SEP] at d0 + n


@pytest.mark.parametrize("n", [10, 40, 66, 67, 80])
def test_stage1_layout_and_counts(small_tok, n):
    tok = small_tok
    out = stage1(tok, make_record(n), seed=n)
    ids, att, ml, rl = (out[k] for k in ("input_ids", "attention_mask", "mask_labels", "replace_labels"))
    for a in (ids, att, ml, rl):
        assert a.shape == (180,) and a.dtype == np.int32
    prompt, d0, sep = _layout(tok, n)
    assert ids[0] == tok.cls_id
    assert ids[1] == tok.symbol_ids["[tops_sign]"]
    assert ids[2:d0].tolist() == prompt
    assert ids[sep] == tok.sep_id
    assert tok.sep_id not in ids[sep + 1 :].tolist()  # no trailing [SEP]

    n_mask, n_rep = int(n * 0.15 * 0.8), int(n * 0.15 * 0.1)
    desc = ids[d0:sep]
    assert (desc == tok.mask_id).sum() == n_mask
    assert rl.sum() == n_rep == rl[d0:sep].sum()
    assert n_rep == (1 if n >= 67 else 0)

    # Targets: exactly the masked + replaced description positions, plus the attribute masks.
    desc_targets = set(np.flatnonzero(desc == tok.mask_id) + d0) | set(np.flatnonzero(rl))
    assert set(np.flatnonzero(ml[:sep] != -100)) == desc_targets
    assert (ml[: d0] == -100).all() and ml[sep] == -100
    attr_targets = np.flatnonzero(ml[sep + 1 :] != -100) + sep + 1
    assert len(attr_targets) > 0 and (ids[attr_targets] == tok.mask_id).all()
    assert ((ids[sep + 1 :] == tok.mask_id) == (ml[sep + 1 :] != -100)).all()

    real = int(att.sum())
    assert att[:real].all() and not att[real:].any()
    assert (ids[real:] == tok.pad_id).all() and (ml[real:] == -100).all() and not rl[real:].any()


def test_stage1_fixed_and_scrambled_labels(small_tok):
    tok = small_tok
    n = 80
    orig = np.array(tok.wordpiece_ids(" ".join(WORDS[:n])))
    _, d0, sep = _layout(tok, n)
    for seed in range(5):
        scr = stage1(tok, make_record(n), seed=seed)
        fix = stage1(tok, make_record(n), seed=seed, fix=True)
        for k in ("input_ids", "attention_mask", "replace_labels"):
            np.testing.assert_array_equal(scr[k], fix[k])
        np.testing.assert_array_equal(scr["mask_labels"] != -100, fix["mask_labels"] != -100)
        pos = np.flatnonzero(fix["mask_labels"][:sep] != -100)
        # Fixed: each position gets its own original token.
        np.testing.assert_array_equal(fix["mask_labels"][pos], orig[pos - d0])
        # Scrambled: the same multiset of targets, just paired in another order.
        counts = collections.Counter
        assert counts(scr["mask_labels"][pos].tolist()) == counts(orig[pos - d0].tolist())
        # Attribute targets are aligned in both modes.
        np.testing.assert_array_equal(scr["mask_labels"][sep:], fix["mask_labels"][sep:])
    # With 12 description targets, some seed must pair them differently from the fixed labels.
    def differs(s):
        scr = stage1(tok, make_record(n), seed=s)["mask_labels"]
        return (scr != stage1(tok, make_record(n), seed=s, fix=True)["mask_labels"]).any()

    assert any(differs(s) for s in range(5))


def test_stage1_clean_copy_restores_every_corrupted_position(small_tok):
    tok = small_tok
    n = 80  # long enough for a replaced token as well as masks
    rec = make_record(n)
    plain = stage1(tok, rec, seed=3, fix=True)
    out = build_stage1_text(rec, tok, CATEGORY_SYMBOLS, Lexicon.empty(), np.random.default_rng(3),
                            180, fix_mlm_labels=True, clean_copy=True)
    # The corrupted text and its labels are those of the same draw without the copy.
    for k in plain:
        np.testing.assert_array_equal(out[k], plain[k])
    ids, clean, ml = out["input_ids"], out["clean_ids"], out["mask_labels"]
    targets = ml != -100
    assert targets.sum() > 0 and out["replace_labels"].sum() == 1
    np.testing.assert_array_equal(clean[targets], ml[targets])  # the original tokens
    np.testing.assert_array_equal(clean[~targets], ids[~targets])
    assert tok.mask_id not in clean.tolist()
    assert "clean_ids" not in plain


# The reference's own labelling rule (FashionSAP-style ``process_description`` followed by
# ``get_text_train_labels``), transcribed statement by statement so that B2 is pinned to the
# reference and not to fine_jax's reading of it: targets are collected in permutation order, but
# handed out to the labelled positions in ascending position order.
def reference_description_labels(tokens, perm, keep=None):
    """mask_labels of a description of word-piece ids ``tokens`` given the shuffled positions
    ``perm``; ``keep`` = how many description positions survive truncation (all if None)."""
    tokens_length = len(tokens)
    mask_token = []
    mask_sign = [0] * tokens_length
    mask_length = int(tokens_length * 0.15 * 0.8)
    for i in range(mask_length):
        mask_token.append(tokens[perm[i]])
        mask_sign[perm[i]] = 1
    replace_length = int(tokens_length * 0.15 * 0.1)
    for i in range(mask_length, mask_length + replace_length):
        mask_token.append(tokens[perm[i]])
        mask_sign[perm[i]] = 1
    if keep is not None:
        mask_sign = mask_sign[:keep]
    mask_token = mask_token[: sum(mask_sign)]
    mask_labels = [-100] * len(mask_sign)
    mask_pos = [i for i, a in enumerate(mask_sign) if a == 1]
    assert len(mask_pos) == len(mask_token)
    for p, l in zip(mask_pos, mask_token):
        mask_labels[p] = l
    return mask_labels


class _PermutationSpy:
    """A np.random.Generator stand-in that records every permutation it hands out.

    It draws from the wrapped generator, so the text built with it is the one the bare generator
    gives (checked below); the first recorded permutation is the description's.
    """

    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)
        self.permutations = []

    def permutation(self, x):
        out = self._rng.permutation(x)
        self.permutations.append(np.array(out))
        return out

    def __getattr__(self, name):
        return getattr(self._rng, name)


def _description(n):
    """A description of exactly n word-pieces: w0..w79 are one piece each, "w<i>s" two (w<i> ##s),
    so lengths up to 160 exist and the targets are mostly distinct tokens."""
    assert n <= 2 * N_WORDS
    plural = max(0, n - N_WORDS)
    return " ".join(f"{w}s" if i < plural else w for i, w in enumerate(WORDS[: n - plural]))


def _spied_stage1(tok, n, seed, max_len, fix=False):
    spy = _PermutationSpy(seed)
    # Antonyms for every word, so the replacement branch draws from the generator in both ways.
    lex = Lexicon(antonyms={w: ["opp"] for w in WORDS})
    out = build_stage1_text(make_record(description=_description(n)), tok, CATEGORY_SYMBOLS, lex, spy,
                            max_len, fix_mlm_labels=fix)
    plain = build_stage1_text(make_record(description=_description(n)), tok, CATEGORY_SYMBOLS, lex,
                              np.random.default_rng(seed), max_len, fix_mlm_labels=fix)
    for k in out:
        np.testing.assert_array_equal(out[k], plain[k], err_msg=k)
    return out, spy.permutations


# 67 word-pieces is the shortest description with a replaced token (int(n * 0.015) >= 1); 134 and
# 160 have two, so replaced targets also take part in the scramble among themselves.
@pytest.mark.parametrize("n", [9, 40, 66, 67, 80, 100, 134, 160])
def test_stage1_description_labels_follow_reference_scramble(small_tok, n):
    tok = small_tok
    orig = tok.wordpiece_ids(pre_caption(_description(n)))
    assert len(orig) == n
    _, d0, sep = _layout(tok, n)
    n_mask, n_rep = int(n * 0.15 * 0.8), int(n * 0.15 * 0.1)
    scrambled = 0
    for seed in range(6):
        out, perms = _spied_stage1(tok, n, seed, max_len=400)
        perm = perms[0]
        assert sorted(perm.tolist()) == list(range(n))
        # The description permutation is the generator's first draw, as in the reference.
        np.testing.assert_array_equal(perm, np.random.default_rng(seed).permutation(n))
        # It is the permutation that chose the corrupted positions.
        assert (out["input_ids"][d0 + perm[:n_mask]] == tok.mask_id).all()
        rep = np.zeros(n, np.int32)
        rep[perm[n_mask : n_mask + n_rep]] = 1
        np.testing.assert_array_equal(out["replace_labels"][d0:sep], rep)

        expected = reference_description_labels(orig, perm.tolist())
        np.testing.assert_array_equal(out["mask_labels"][d0:sep], expected)
        own = [t if lab != -100 else -100 for t, lab in zip(orig, expected)]
        scrambled += expected != own

        # The fix: the same labelled positions, each holding its own original token.
        fixed, fixed_perms = _spied_stage1(tok, n, seed, max_len=400, fix=True)
        np.testing.assert_array_equal(fixed_perms[0], perm)
        np.testing.assert_array_equal(fixed["mask_labels"][d0:sep], own)
        # Attribute-prompt targets are aligned in both modes.
        np.testing.assert_array_equal(fixed["mask_labels"][sep:], out["mask_labels"][sep:])
    if n_mask + n_rep >= 4:
        assert scrambled > 0, "no seed scrambled the labels: the comparison would not see B2"


@pytest.mark.parametrize("max_len", [60, 40, 20])
def test_stage1_truncated_description_labels_follow_reference(small_tok, max_len):
    # Truncation inside the description: the reference cuts the permutation-ordered targets to the
    # number of labelled positions that survive, then pairs them in position order.
    tok = small_tok
    n = 134
    orig = tok.wordpiece_ids(pre_caption(_description(n)))
    _, d0, _ = _layout(tok, n)
    keep = max_len - d0
    for seed in range(4):
        out, perms = _spied_stage1(tok, n, seed, max_len=max_len)
        expected = reference_description_labels(orig, perms[0].tolist(), keep=keep)
        np.testing.assert_array_equal(out["mask_labels"][d0:], expected)
        fixed, _ = _spied_stage1(tok, n, seed, max_len=max_len, fix=True)
        pos = np.flatnonzero(fixed["mask_labels"] != -100)
        np.testing.assert_array_equal(pos, np.flatnonzero(out["mask_labels"] != -100))
        np.testing.assert_array_equal(fixed["mask_labels"][pos], np.asarray(orig)[pos - d0])


def _attribute_pairs(tok, out, n):
    """Splits the attribute part into [(name_ids, value_ids, name_labels, value_labels)]."""
    _, _, sep = _layout(tok, n)
    real = int(out["attention_mask"].sum())
    ids = out["input_ids"][sep + 1 : real].tolist()
    ml = out["mask_labels"][sep + 1 : real].tolist()
    the, image, is_ = (tok.token_to_id(w) for w in ("the", "image", "is"))
    starts = [i for i in range(len(ids) - 1) if ids[i] == the and ids[i + 1] == image]
    starts.append(len(ids))
    pairs = []
    for a, b in zip(starts[:-1], starts[1:]):
        seg, lab = ids[a + 2 : b], ml[a + 2 : b]
        k = seg.index(is_)
        pairs.append((seg[:k], seg[k + 1 :], lab[:k], lab[k + 1 :]))
    return pairs


def test_stage1_attribute_prompts(small_tok):
    tok = small_tok
    names = {
        tuple(tok.wordpiece_ids(n))
        for n in ("category", "composition", "gender", "name", "season", "sub category")
    }
    values = {
        tuple(tok.wordpiece_ids(v))
        for v in (
            "tops", "t-shirts", "100% cotton", "men", "black logo jacket and coats", "spring summer 2017"
        )
    }
    seen_name_mask = seen_value_mask = False
    orders = set()
    for seed in range(30):
        out = stage1(tok, make_record(10), seed=seed)
        pairs = _attribute_pairs(tok, out, 10)
        assert len(pairs) == 6
        restored = []
        for i, (name, value, nl, vl) in enumerate(pairs):
            if i == 2:
                assert (all(t == tok.mask_id for t in name) and vl == [-100] * len(vl)) != (
                    all(t == tok.mask_id for t in value) and nl == [-100] * len(nl)
                )
                if name and all(t == tok.mask_id for t in name):
                    seen_name_mask = True
                    name = nl  # the labels restore the masked name exactly
                else:
                    seen_value_mask = True
                    value = vl
            else:
                assert nl == [-100] * len(nl) and vl == [-100] * len(vl)
            restored.append((tuple(name), tuple(value)))
        assert {n for n, _ in restored} == names
        assert {v for _, v in restored} == values
        orders.add(tuple(n for n, _ in restored))
    assert seen_name_mask and seen_value_mask
    assert len(orders) > 5  # key order is shuffled


def test_stage1_synonym_noise_only_on_first_value(small_tok):
    tok = small_tok
    lex = Lexicon(synonyms={"men": ["guys"], "cotton": ["guys"]})
    guys = tok.token_to_id("guys")
    swapped = 0
    for seed in range(120):
        out = stage1(tok, make_record(10), seed=seed, lexicon=lex)
        pairs = _attribute_pairs(tok, out, 10)
        for i, (_, value, _, vl) in enumerate(pairs):
            if guys in value:
                assert i == 0  # only the first value is noised
                assert vl == [-100] * len(vl)  # and the swap carries no label
                swapped += 1
    assert 0 < swapped < 60


def test_stage1_replacement(small_tok):
    tok = small_tok
    n = 80
    _, d0, sep = _layout(tok, n)
    for antonym, expected in (("opp", "opp"), ("ill_will", "[UNK]")):
        lex = Lexicon(antonyms={w: [antonym] for w in WORDS})
        kinds = collections.Counter()
        for seed in range(40):
            out = stage1(tok, make_record(n), seed=seed, lexicon=lex, fix=True)
            (p,) = np.flatnonzero(out["replace_labels"])
            assert d0 <= p < sep
            assert out["mask_labels"][p] == tok.token_to_id(WORDS[p - d0])
            got = out["input_ids"][p]
            kinds["antonym" if got == tok.token_to_id(expected) else "random"] += 1
        assert kinds["antonym"] > 5 and kinds["random"] > 5
    # Without a lexicon entry, the antonym branch leaves the token unchanged but still labels it.
    unchanged = 0
    for seed in range(40):
        out = stage1(tok, make_record(n), seed=seed)
        (p,) = np.flatnonzero(out["replace_labels"])
        unchanged += int(out["input_ids"][p] == tok.token_to_id(WORDS[p - d0]))
    assert unchanged > 5


def test_stage1_deterministic(small_tok):
    tok = small_tok
    a = stage1(tok, make_record(80), seed=7)
    b = stage1(tok, make_record(80), seed=7)
    c = stage1(tok, make_record(80), seed=8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any((a[k] != c[k]).any() for k in a)
    clone = pickle.loads(pickle.dumps(tok))
    d = stage1(clone, make_record(80), seed=7)
    for k in a:
        np.testing.assert_array_equal(a[k], d[k])


def test_stage1_truncation(small_tok):
    tok = small_tok
    full = stage1(tok, make_record(80), seed=3, max_len=400, fix=True)
    real = int(full["attention_mask"].sum())
    assert real > 100
    for max_len in (100, 40, 20):
        cut = stage1(tok, make_record(80), seed=3, max_len=max_len, fix=True)
        for k in cut:
            assert cut[k].shape == (max_len,)
            np.testing.assert_array_equal(cut[k], full[k][:max_len])
        assert cut["attention_mask"].all()
    # Scrambled labels keep the targets in their order when later ones are cut off.
    full_s = stage1(tok, make_record(80), seed=3, max_len=400)
    cut_s = stage1(tok, make_record(80), seed=3, max_len=40)
    pos = np.flatnonzero(cut_s["mask_labels"] != -100)
    np.testing.assert_array_equal(cut_s["mask_labels"][pos], full_s["mask_labels"][pos])


def test_stage1_category_errors(small_tok):
    with pytest.raises(KeyError, match="Gowns.*categorys_to_sign"):
        stage1(small_tok, make_record(10, category="Gowns"))
    out = stage1(small_tok, make_record(10, category="JACKETS & COATS"))
    assert out["input_ids"][1] == small_tok.symbol_ids["[coats_sign]"]
    with pytest.raises(ValueError, match="season"):
        stage1(small_tok, make_record(10, season="2017"))


# ------------------------------------------------------------------------------------------------
# Parity with transformers on the reference vocab
# ------------------------------------------------------------------------------------------------


def test_reference_vocab_ids(ref_tok):
    assert ref_tok.vocab_size == 30522
    special = (ref_tok.pad_id, ref_tok.unk_id, ref_tok.cls_id, ref_tok.sep_id, ref_tok.mask_id)
    assert special == (0, 100, 101, 102, 103)
    assert [ref_tok.symbol_ids[s] for s in SYMBOL_TOKENS] == list(range(1, 10))


def test_eval_texts_match_transformers(shared_data, ref_tok, hf_tok):
    captions = [d["caption"] for d in json.loads((shared_data / "fashiongen_val_sample.json").read_text())]
    assert len(captions) == 301
    texts = [eval_text(c) for c in captions]
    hf = hf_tok(texts, padding="max_length", truncation=True, max_length=180)
    for i, (c, t) in enumerate(zip(captions, texts)):
        ids, mask = encode_eval_caption(ref_tok, c, 180)
        assert ids.tolist() == hf["input_ids"][i], t
        assert mask.tolist() == hf["attention_mask"][i], t
        # Raw captions (upper case, punctuation, accents) exercise the normaliser too.
        assert ref_tok.wordpiece_ids(c) == hf_tok.convert_tokens_to_ids(hf_tok.tokenize(c)), c
    # Short max_len exercises truncation: [CLS] ... [SEP] kept.
    hf_short = hf_tok(texts[:20], padding="max_length", truncation=True, max_length=16)
    for i, t in enumerate(texts[:20]):
        assert encode_eval(ref_tok, t, 16)[0].tolist() == hf_short["input_ids"][i]
    # Symbols are unsplittable.
    s = "coats [coats_sign]jacket [others_sign]"
    assert ref_tok.wordpiece_ids(s) == hf_tok.convert_tokens_to_ids(hf_tok.tokenize(s))
    assert ref_tok.wordpiece_ids(s)[1] == 4


def test_reference_category_symbols(shared_data):
    cats = load_category_symbols(shared_data / "categorys_to_sign.txt")
    assert len(cats) == 48
    assert set(cats.values()) == set(SYMBOL_TOKENS)
    assert all(k == k.lower() for k in cats)
    assert cats["jackets & coats"] == "[coats_sign]" and cats["tops"] == "[tops_sign]"
    samples = json.loads((shared_data / "fashiongen_val_symbol_sample.json").read_text())
    assert len(samples) == 301
    for s in samples:
        assert f"[{s['caption'].split(' ', 1)[0]}]" in SYMBOL_TOKENS


def test_stage1_on_reference_vocab(shared_data, ref_tok):
    cats = load_category_symbols(shared_data / "categorys_to_sign.txt")
    caption = json.loads((shared_data / "fashiongen_val_sample.json").read_text())[0]["caption"]
    rec = dict(
        description=caption,
        category="JACKETS & COATS",
        subcategory="DENIM JACKETS",
        composition="100% cotton.",
        gender="Men",
        name="Blue Denim Jogg Jacket",
        season="FW2016",
    )
    out = build_stage1_text(rec, ref_tok, cats, Lexicon.empty(), np.random.default_rng(0), 180)
    ids = out["input_ids"]
    assert ids[0] == 101 and ids[1] == 4
    n = len(ref_tok.wordpiece_ids(pre_caption(caption)))
    assert ids[6 + n] == 102
    assert (ids[6 : 6 + n] == 103).sum() == int(n * 0.15 * 0.8)
    text = ref_tok.decode(ids[6 + n + 1 : int(out["attention_mask"].sum())])
    assert "fall winter 2016" in text or "season is [MASK]" in text
    assert "the image sub category is" in text or "[MASK] [MASK] is denim jackets" in text


# ------------------------------------------------------------------------------------------------
# Stage-1 text without the symbol token and/or the attribute prompts (data.stage1_symbol /
# data.stage1_attributes)
# ------------------------------------------------------------------------------------------------


def _stage1_parts(tok, symbol, attributes, seed=3):
    return build_stage1_text(make_record(n_words=20), tok, CATEGORY_SYMBOLS, Lexicon.empty(),
                             np.random.default_rng(seed), 180, fix_mlm_labels=True, symbol=symbol,
                             attributes=attributes)


def test_stage1_text_without_symbol_starts_with_the_prompt(small_tok):
    full = _stage1_parts(small_tok, True, True)
    bare = _stage1_parts(small_tok, False, True)
    prompt = small_tok.wordpiece_ids("the image description is")
    assert full["input_ids"][1] == small_tok.token_to_id("[tops_sign]")
    assert list(bare["input_ids"][1:1 + len(prompt)]) == prompt
    assert small_tok.token_to_id("[tops_sign]") not in bare["input_ids"]
    # Same draws otherwise: everything after the symbol moves one position to the left.
    n = int(full["attention_mask"].sum())
    assert int(bare["attention_mask"].sum()) == n - 1
    for key in ("input_ids", "mask_labels", "replace_labels"):
        np.testing.assert_array_equal(bare[key][1:n - 1], full[key][2:n], err_msg=key)


def test_stage1_text_without_attributes_ends_at_sep(small_tok):
    full = _stage1_parts(small_tok, True, True)
    bare = _stage1_parts(small_tok, True, False)
    n = int(bare["attention_mask"].sum())
    assert bare["input_ids"][n - 1] == small_tok.sep_id
    assert list(bare["input_ids"][n:]) == [small_tok.pad_id] * (180 - n)
    # The description part, its masking and its labels are those of the full text.
    np.testing.assert_array_equal(bare["input_ids"][:n], full["input_ids"][:n])
    np.testing.assert_array_equal(bare["mask_labels"][:n], full["mask_labels"][:n])
    assert (bare["mask_labels"][n:] == -100).all()
    assert (full["mask_labels"][n:] != -100).any(), "the full text has attribute MLM targets"


def test_stage1_text_without_symbol_still_checks_the_category(small_tok):
    with pytest.raises(KeyError, match="category-to-symbol"):
        build_stage1_text(make_record(category="Unknown"), small_tok, CATEGORY_SYMBOLS,
                          Lexicon.empty(), np.random.default_rng(0), 180, symbol=False)

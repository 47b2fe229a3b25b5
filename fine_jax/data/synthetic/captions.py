"""The words of the synthetic set: product descriptions in FashionGen's style, and its vocab.

Descriptions name every visual attribute (colour, pattern, each local detail) in FashionGen's
sentence style. The vocab is a BERT-uncased WordPiece vocab over the set's own texts.
"""
from __future__ import annotations

import os
import string
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # the catalogue imports this module for its descriptions
    from fine_jax.data.synthetic.catalogue import Product, Subcategory

SYMBOL_TOKENS: tuple[str, ...] = (
    "[tops_sign]", "[pants_sign]", "[skirts_sign]", "[coats_sign]", "[dresses_sign]",
    "[shoes_sign]", "[bags_sign]", "[accessories_sign]", "[others_sign]",
)
# Vocab layout: [PAD] at 0, the symbols at 1-9 (as in the reference vocab), then these.
SPECIAL_TOKENS: tuple[str, ...] = ("[UNK]", "[CLS]", "[SEP]", "[MASK]")


def pattern_sentence(pattern: str, second: str) -> str:
    return {
        "solid": "Solid color throughout.",
        "stripes": f"Striped pattern in {second} throughout.",
        "checks": f"Check pattern in {second} throughout.",
        "dots": f"Polka dot pattern in {second} throughout.",
        "colorblock": f"Colorblocked panel in {second} at bottom.",
    }[pattern]


# Caption sentence of each detail: the most specific of (subcategory, detail), (kind, detail),
# detail applies.
_DETAIL_TEXT: dict[Any, str] = {
    "chest pocket": "Patch pocket at chest.",
    "patch pocket": "Patch pocket at front.",
    "front pocket": "Patch pocket at face.",
    "logo patch": "Logo patch at front.",
    ("upper", "logo patch"): "Logo patch at chest.",
    ("lower", "logo patch"): "Logo patch at hip.",
    ("skirt", "logo patch"): "Logo patch at hip.",
    ("shoe", "logo patch"): "Logo patch at side.",
    ("bag", "logo patch"): "Logo patch at face.",
    ("scarf", "logo patch"): "Logo patch at end.",
    "button placket": "Button closure at front.",
    "zip": "Zip closure at front.",
    ("lower", "zip"): "Zip fly.",
    ("shoe", "zip"): "Zip closure at heel.",
    ("bag", "zip"): "Zip closure at top.",
    ("CREWNECKS", "zip"): "Half-zip closure at front.",
    "collar": "Contrast spread collar.",
    "cuffs": "Contrast rib knit cuffs.",
    ("lower", "cuffs"): "Contrast cuffs at hem.",
    ("SWIM SHORTS", "cuffs"): "Contrast trim at hem.",
    "drawstring": "Drawstring at waistband.",
    ("upper", "drawstring"): "Drawstring at hem.",
    ("HOODIES & ZIPUPS", "drawstring"): "Drawstring at hood.",
    "belt": "Buckled belt at waist.",
    "trim": "Contrast trim at neckline.",
    ("CREWNECKS", "trim"): "Contrast trim at hem.",
    ("CAPS", "trim"): "Contrast band above brim.",
    ("BEANIES", "trim"): "Contrast fold-over band.",
    ("scarf", "trim"): "Contrast trim at edges.",
    "laces": "Lace-up closure.",
    "contrast sole": "Contrast rubber sole.",
    "toe cap": "Contrast toe cap.",
    "heel tab": "Pull tab at heel.",
    "buckle strap": "Buckled strap at face.",
    "pom pom": "Pom pom at crown.",
    "button top": "Button at crown.",
    "fringe": "Fringed edges.",
}


def detail_sentence(sub: Subcategory, detail: str) -> str:
    for key in ((sub.subcategory, detail), (sub.kind, detail), detail):
        if key in _DETAIL_TEXT:
            return _DETAIL_TEXT[key]
    raise KeyError(f"no caption sentence for detail {detail!r}")


def description_sentences(product: Product) -> list[str]:
    """The sentences of a product's description: garment and colour, pattern, each detail."""
    sub = product.spec
    head = " ".join(w for w in (sub.descriptor, product.fabric, sub.noun) if w) + f" in {product.colour}."
    out = [head[0].upper() + head[1:], pattern_sentence(product.pattern, product.second_colour)]
    out += [detail_sentence(sub, d) for d in product.details]
    out.append("Tonal stitching.")
    return out


# A small lexicon over the dataset's own words, in the layout fine_jax.data.text.Lexicon reads.
# As with WordNet, a word's synonym list includes the word itself.
LEXICON: dict[str, dict[str, list[str]]] = {
    "antonyms": {
        "light": ["dark"], "dark": ["light"], "short": ["long"], "long": ["short"],
        "black": ["white"], "white": ["black"], "high": ["low"], "low": ["high"],
        "top": ["bottom"], "bottom": ["top"], "front": ["back"], "back": ["front"],
        "men": ["women"], "women": ["men"], "spring": ["fall"], "fall": ["spring"],
        "summer": ["winter"], "winter": ["summer"], "contrast": ["tonal"], "tonal": ["contrast"],
        "solid": ["patterned"], "tall": ["short"],
    },
    "synonyms": {
        "pants": ["pants", "trousers"], "trousers": ["trousers", "pants"],
        "sneakers": ["sneakers", "trainers"], "sweaters": ["sweaters", "jumpers"],
        "sweater": ["sweater", "jumper"], "hoodie": ["hoodie", "sweatshirt"],
        "jackets": ["jackets", "outerwear"], "coats": ["coats", "outerwear"],
        "cotton": ["cotton"], "wool": ["wool"], "bags": ["bags", "handbags"],
        "hats": ["hats", "headwear"], "scarves": ["scarves", "mufflers"],
        "closure": ["closure", "fastening"], "women": ["women", "ladies"],
    },
}

# Words the text pipeline adds around captions and attributes (method_spec 6.3): the vocab must
# hold them whole.
_PIPELINE_TEXTS: tuple[str, ...] = (
    "the image description is", "the image", "is", "sub category", "spring summer fall winter",
    "and", "category composition gender name season subcategory", "0 1 2 3 4 5 6 7 8 9",
)


def _bert_words(texts: Iterable[str]) -> Counter:
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for t in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    return counts


def build_vocab(texts: Iterable[str]) -> list[str]:
    """A BERT-uncased WordPiece vocab for a closed corpus: every corpus word whole, then characters.

    Layout: [PAD], the 9 symbols (ids 1-9, as in the reference vocab), [UNK] [CLS] [SEP] [MASK],
    the corpus words (most frequent first, ties alphabetical), then every single character and
    its ``##`` continuation, so that text outside the corpus still tokenises without [UNK].

    The words are split with the ``tokenizers`` BERT normaliser and pre-tokeniser, i.e. exactly
    as the tokenizer will split them. ``WordPieceTrainer`` is not used: with a corpus this small
    its merge ties are broken in hash order, so the learned pieces differ between processes, and
    the dataset (vocab included) must be a pure function of the seed.
    """
    counts = _bert_words(texts)
    vocab = ["[PAD]", *SYMBOL_TOKENS, *SPECIAL_TOKENS]
    seen = set(vocab)
    for w in sorted(counts, key=lambda w: (-counts[w], w)):
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    chars = set(string.ascii_lowercase + string.digits + string.punctuation)
    for w in counts:
        chars.update(w)
    for ch in sorted(chars):
        if ch not in seen:
            vocab.append(ch)
            seen.add(ch)
    for ch in sorted(chars):
        piece = "##" + ch
        if ch.isalnum() and piece not in seen:
            vocab.append(piece)
            seen.add(piece)
    return vocab


def vocab_texts(products: Sequence[Product]) -> list[str]:
    """Every text the pipeline will tokenise for these products, plus the pipeline's own words."""
    texts = list(_PIPELINE_TEXTS)
    for p in products:
        season = ("spring summer " if p.season.startswith("SS") else "fall winter ") + p.season[2:]
        texts += [p.description, p.category, p.subcategory, p.category.replace("&", "and"),
                  p.subcategory.replace("&", "and"), p.composition, p.gender, p.name, p.season, season]
    for table in LEXICON.values():
        for w, cands in table.items():
            texts.append(w)
            texts += cands
    return texts


def count_unknown(vocab_path: str | os.PathLike, texts: Iterable[str]) -> int:
    """Number of [UNK] pieces when ``texts`` are tokenised with the BERT-uncased tokenizer on the vocab."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(os.fspath(vocab_path), lowercase=True)
    unk = tok.token_to_id("[UNK]")
    return sum(enc.ids.count(unk) for enc in tok.encode_batch(list(texts), add_special_tokens=False))

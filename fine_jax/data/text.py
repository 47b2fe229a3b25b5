"""Text normalisation, tokenisation and the FashionGen text builders (stages 1 and 2, evaluation).

Everything here runs inside grain worker processes, so every object is picklable and every random
choice draws from the ``np.random.Generator`` passed in: the same generator state gives the same
sequence.

Faithfulness notes (method_spec §6.3, §10):

* Stage-1 MLM targets of the description are paired with the masked positions in the reference's
  scrambled order (B2) unless ``fix_mlm_labels=True``.
* Antonyms replace a word-piece *as a raw token*: an antonym that is not a vocab entry (multi-word
  WordNet lemmas such as ``ill_will`` included) becomes [UNK] (B9). Synonyms of the first attribute
  value are spliced into the value *string* and then tokenised, so their "_" becomes a word-piece.
* Evaluation texts get [CLS] ... [SEP] from the HF tokenizer call; stage-2 training texts have no
  [SEP] (B5).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "SYMBOL_TOKENS",
    "DESCRIPTION_PROMPT",
    "IGNORE_LABEL",
    "ATTRIBUTE_KEYS",
    "Lexicon",
    "Tokenizer",
    "build_stage1_text",
    "build_stage2_text",
    "encode_eval",
    "encode_eval_caption",
    "eval_text",
    "load_category_symbols",
    "parse_season",
    "pre_caption",
]

# Ids 1-9 of the reference vocab, where bert-base-uncased has [unused0]..[unused8].
SYMBOL_TOKENS: tuple[str, ...] = (
    "[tops_sign]",
    "[pants_sign]",
    "[skirts_sign]",
    "[coats_sign]",
    "[dresses_sign]",
    "[shoes_sign]",
    "[bags_sign]",
    "[accessories_sign]",
    "[others_sign]",
)

_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

DESCRIPTION_PROMPT = "the image description is"

# Record keys in the reference's attribute order (before the shuffle), with the names the prompts use.
ATTRIBUTE_KEYS: tuple[str, ...] = ("category", "composition", "gender", "name", "season", "subcategory")
_ATTRIBUTE_NAMES: dict[str, str] = {
    "category": "category",
    "composition": "composition",
    "gender": "gender",
    "name": "name",
    "season": "season",
    "subcategory": "sub category",
}

# Stage-1 corruption rates; the products are evaluated left to right in float64, as in the reference.
_MASK_RATE = 0.15
_MASK_SHARE = 0.8
_REPLACE_SHARE = 0.1
_RANDOM_REPLACE_PROB = 0.5
_SYNONYM_PROB = 0.15
_MASKED_ATTRIBUTE = 2  # the 3rd attribute (in shuffled order) has its name or its value masked

IGNORE_LABEL = -100


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------

_PUNCT_RE = re.compile(r"[,.'!\"()*#:;~]")
_MULTI_SPACE_RE = re.compile(r"\s{2,}")


def pre_caption(caption: str) -> str:
    """The reference caption normalisation (FashionSAP ``dataset/utils.py``), without a word limit.

    The order matters and is the reference's: lower-case, delete , . ' ! " ( ) * # : ; ~ ("?" is
    kept), then "-" and "/" -> space, "<person>" -> "person", "<br>" -> space, then runs of two or
    more whitespace characters -> one space, then strip newlines at the end and spaces at both ends.
    A single tab or newline inside the text survives, as in the reference; the tokenizer treats it
    as whitespace.
    """
    caption = _PUNCT_RE.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person").replace("<br>", " ")
    caption = _MULTI_SPACE_RE.sub(" ", caption)
    return caption.rstrip("\n").strip(" ")


def eval_text(description: str) -> str:
    """Evaluation text of a product: the prompt is prepended *after* normalising the description."""
    return DESCRIPTION_PROMPT + " " + pre_caption(description)


def parse_season(season: str) -> str:
    """"SS2017" -> "spring summer 2017", "FW2016" -> "fall winter 2016"."""
    if not isinstance(season, str) or len(season) != 6 or season[:2] not in ("SS", "FW"):
        raise ValueError(
            f"season {season!r} is not in the FashionGen format: 'SS' or 'FW' followed by a 4-digit year"
        )
    prefix, year = season[:2], season[2:]
    return ("spring summer" if prefix == "SS" else "fall winter") + " " + year


def load_category_symbols(path: str | os.PathLike) -> dict[str, str]:
    """Reads ``categorys_to_sign.txt``: one ``category<TAB>symbol`` per line -> {category: symbol}.

    Categories are stored as written (the reference file is lower-case and lookups lower-case the
    product's category). Blank lines are skipped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"category-to-symbol file not found: {path}")
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.strip().split("\t")
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise ValueError(
                    f"{path}:{lineno}: expected 'category<TAB>symbol', got {line.rstrip(chr(10))!r}"
                )
            mapping[fields[0]] = fields[1]
    return mapping


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _read_vocab(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocab file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


class Tokenizer:
    """BERT uncased WordPiece tokenizer equal to ``transformers.BertTokenizer`` on the same vocab.

    The 9 fashion symbols must already be vocab entries (the reference vocab has them at ids 1-9);
    they and [PAD]/[UNK]/[CLS]/[SEP]/[MASK] are registered as unsplittable special tokens, matched
    case-sensitively in the raw text, as HF does. Special ids are looked up by token.

    Pickles as its token list; the ``tokenizers`` backend is rebuilt on first use in each process.
    """

    def __init__(self, tokens: Sequence[str], source: str = "<memory>"):
        self._tokens: list[str] = list(tokens)
        self._source = source
        vocab: dict[str, int] = {}
        for i, tok in enumerate(self._tokens):
            if tok in vocab:
                raise ValueError(
                    f"{source}: token {tok!r} appears twice (lines {vocab[tok] + 1} and {i + 1})"
                )
            vocab[tok] = i
        self._vocab = vocab
        missing = [t for t in _SPECIAL_TOKENS + SYMBOL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(
                f"{source}: vocab lacks {missing}; the fashion symbols belong in place of "
                "[unused0]..[unused8] (ids 1-9) so that no new embeddings are needed"
            )
        self.vocab_size = len(self._tokens)
        self.pad_id = vocab["[PAD]"]
        self.unk_id = vocab["[UNK]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.mask_id = vocab["[MASK]"]
        self.symbol_ids: dict[str, int] = {t: vocab[t] for t in SYMBOL_TOKENS}
        self._backend = None

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        return cls(_read_vocab(path), source=path)

    # Pickles carry only the vocab; each worker process rebuilds its own backend on first use.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_backend"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def backend(self):
        if self._backend is None:
            self._backend = self._build_backend()
        return self._backend

    def _build_backend(self):
        from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as _Backend

        model = models.WordPiece(
            vocab=dict(self._vocab),
            unk_token="[UNK]",
            continuing_subword_prefix="##",
            max_input_chars_per_word=100,
        )
        backend = _Backend(model)
        # strip_accents=None follows lowercase, as in bert-base-uncased.
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS + SYMBOL_TOKENS]
        )
        return backend

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size})"

    def wordpiece_ids(self, text: str) -> list[int]:
        """Word-piece ids of ``text``, no [CLS]/[SEP] (HF ``tokenize`` + ``convert_tokens_to_ids``)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def wordpieces(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def token_to_id(self, token: str) -> int:
        """Exact vocab lookup; an unknown token is [UNK], like HF ``convert_tokens_to_ids``."""
        return self._vocab.get(token, self.unk_id)

    def has_token(self, token: str) -> bool:
        return token in self._vocab

    def id_to_token(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise KeyError(f"token id {token_id} is outside the vocab (size {self.vocab_size})")
        return self._tokens[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------
# Lexicon (antonyms for replaced tokens, synonyms for attribute noise)
# ----------------------------------------------------------------------------------------------


class Lexicon:
    """Word -> candidate antonyms / synonyms. Lookups are case-insensitive, as WordNet's are.

    The candidate lists are used as the reference uses WordNet's, one uniform draw per use:

    * ``antonyms(word)``: for every synset of the word, every lemma that has antonyms contributes
      its *first* antonym's name, duplicates kept (so a repeated name is more likely).
    * ``synonyms(word)``: the distinct lemma names of all synsets of the word, the word itself
      included when WordNet lists it (Fashion-FINE does not discard it).

    An empty list means "no candidate": the word stays as it is. The reference's own source of
    these lists is WordNet: :class:`fine_jax.data.wordnet.WordNetLexicon` has this interface.
    """

    def __init__(
        self,
        antonyms: Mapping[str, Sequence[str]] | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
    ):
        self._antonyms = self._normalise(antonyms, "antonyms", distinct=False)
        self._synonyms = self._normalise(synonyms, "synonyms", distinct=True)

    @staticmethod
    def _normalise(table, kind: str, distinct: bool) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for word, cands in (table or {}).items():
            if isinstance(cands, str) or not all(isinstance(c, str) for c in cands):
                raise ValueError(f"lexicon {kind}[{word!r}] must be a list of strings, got {cands!r}")
            merged = out.get(word.lower(), ()) + tuple(cands)
            # The reference draws synonyms from a set but antonyms from a list with repeats.
            out[word.lower()] = tuple(dict.fromkeys(merged)) if distinct else merged
        return out

    @classmethod
    def empty(cls) -> "Lexicon":
        return cls(None, None)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Lexicon":
        """Reads ``{"antonyms": {word: [..]}, "synonyms": {word: [..]}}``; either table may be absent."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"lexicon file not found: {path}")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or set(data) - {"antonyms", "synonyms"}:
            raise ValueError(f"{path}: expected an object with keys 'antonyms' and/or 'synonyms'")
        return cls(data.get("antonyms"), data.get("synonyms"))

    def antonyms(self, word: str) -> list[str]:
        return list(self._antonyms.get(word.lower(), ()))

    def synonyms(self, word: str) -> list[str]:
        return list(self._synonyms.get(word.lower(), ()))


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------


def _pad(ids: Sequence[int], max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = list(ids)[:max_len]
    out = np.full((max_len,), pad_id, dtype=np.int32)
    mask = np.zeros((max_len,), dtype=np.int32)
    out[: len(ids)] = ids
    mask[: len(ids)] = 1
    return out, mask


def encode_eval(tokenizer: Tokenizer, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """What HF ``tokenizer(text, padding='max_length', truncation=True, max_length=max_len)`` gives."""
    if max_len < 2:
        raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
    ids = [tokenizer.cls_id] + tokenizer.wordpiece_ids(text)[: max_len - 2] + [tokenizer.sep_id]
    return _pad(ids, max_len, tokenizer.pad_id)


def encode_eval_caption(
    tokenizer: Tokenizer, description: str, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation encoding of a product description (stages 1 and 2): [CLS] prompt+caption [SEP]."""
    return encode_eval(tokenizer, eval_text(description), max_len)


def build_stage2_text(description: str, tokenizer: Tokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage-2 training text: [CLS] + word-pieces of pre_caption(prompt + description), no [SEP].

    Returns ``(input_ids, attention_mask)``, int32[max_len]. Padding uses the [PAD] id (0 in the
    reference vocab, where the reference pads with a literal 0).
    """
    ids = [tokenizer.cls_id] + tokenizer.wordpiece_ids(pre_caption(DESCRIPTION_PROMPT + " " + description))
    return _pad(ids, max_len, tokenizer.pad_id)


def _corrupt_description(
    description: str, tokenizer: Tokenizer, lexicon: Lexicon, rng: np.random.Generator
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Stage-1 step 1. Returns (ids, is_target, replaced, original_ids, targets_in_permutation_order)."""
    orig = tokenizer.wordpiece_ids(pre_caption(description))
    ids = list(orig)
    n = len(orig)
    is_target = [0] * n
    replaced = [0] * n
    perm = rng.permutation(n)
    n_mask = int(n * _MASK_RATE * _MASK_SHARE)
    n_replace = int(n * _MASK_RATE * _REPLACE_SHARE)
    perm_targets: list[int] = []
    for k in range(n_mask):
        p = int(perm[k])
        perm_targets.append(orig[p])
        is_target[p] = 1
        ids[p] = tokenizer.mask_id
    for k in range(n_mask, n_mask + n_replace):
        p = int(perm[k])
        perm_targets.append(orig[p])
        is_target[p] = 1
        replaced[p] = 1
        if rng.random() < _RANDOM_REPLACE_PROB:
            # Any vocab entry, [PAD]/[CLS]/symbols included (B9).
            ids[p] = int(rng.integers(tokenizer.vocab_size))
        else:
            # The antonym of the word-piece replaces it as one raw token: out-of-vocab -> [UNK] (B9).
            cands = lexicon.antonyms(tokenizer.id_to_token(orig[p]))
            if cands:
                ids[p] = tokenizer.token_to_id(cands[int(rng.integers(len(cands)))])
    return ids, is_target, replaced, orig, perm_targets


def _attribute_part(
    record: Mapping[str, str], tokenizer: Tokenizer, lexicon: Lexicon, rng: np.random.Generator
) -> tuple[list[int], list[int], list[int]]:
    """Stage-1 step 2. Returns (ids, is_target, own_target) of the attribute prompts."""
    values = {}
    for key in ATTRIBUTE_KEYS:
        if key not in record:
            raise KeyError(f"stage-1 record lacks attribute {key!r} (has {sorted(record)})")
        values[key] = record[key]
    values["season"] = parse_season(values["season"])

    order = [ATTRIBUTE_KEYS[i] for i in rng.permutation(len(ATTRIBUTE_KEYS))]

    # Synonym noise on each space-separated word of the first value; no label.
    words = []
    for word in values[order[0]].split(" "):
        if rng.random() <= _SYNONYM_PROB:
            cands = lexicon.synonyms(word)
            if cands:
                word = cands[int(rng.integers(len(cands)))]
        words.append(word)
    values[order[0]] = " ".join(words)

    segments: list[list[int]] = []  # name1, value1, name2, value2, ...
    for key in order:
        segments.append(tokenizer.wordpiece_ids(_ATTRIBUTE_NAMES[key].lower()))
        segments.append(tokenizer.wordpiece_ids(values[key].replace("&", "and").lower()))

    masked = 2 * _MASKED_ATTRIBUTE + (0 if rng.random() < 0.5 else 1)

    prefix = tokenizer.wordpiece_ids("the image ")
    is_id = tokenizer.token_to_id("is")  # a raw token in the reference, not a tokenised string
    ids: list[int] = []
    is_target: list[int] = []
    own: list[int] = []
    for s, seg in enumerate(segments):
        if s == masked:
            body, body_target = [tokenizer.mask_id] * len(seg), [1] * len(seg)
        else:
            body, body_target = list(seg), [0] * len(seg)
        if s % 2 == 0:
            ids += prefix + body + [is_id]
            is_target += [0] * len(prefix) + body_target + [0]
            own += [IGNORE_LABEL] * len(prefix) + list(seg) + [IGNORE_LABEL]
        else:
            ids += body
            is_target += body_target
            own += list(seg)
    return ids, is_target, own


def build_stage1_text(
    record: Mapping[str, str],
    tokenizer: Tokenizer,
    category_symbols: Mapping[str, str],
    lexicon: Lexicon,
    rng: np.random.Generator,
    max_len: int,
    fix_mlm_labels: bool = False,
    symbol: bool = True,
    attributes: bool = True,
    clean_copy: bool = False,
) -> dict[str, np.ndarray]:
    """Stage-1 text of one image row (method_spec §6.3 steps 1-4, §4.4).

    ``record`` holds ``description``, ``category``, ``subcategory``, ``composition``, ``gender``,
    ``name`` and ``season`` as strings. Returns int32[max_len] arrays ``input_ids``,
    ``attention_mask``, ``mask_labels`` (-100 where there is no target) and ``replace_labels``.

    Layout: [CLS] [symbol] "the image description is" <corrupted description> [SEP]
    <"the image" name "is" value> x 6, no trailing [SEP], truncated to ``max_len``, right-padded.

    ``symbol=False`` leaves out the symbol token and ``attributes=False`` the attribute prompts (and
    their MLM targets); both are on in the reference. Evaluation texts hold neither, so a text tower
    trained from random weights can otherwise learn to read the category from them instead of from
    the description (README, "What the demo reaches today"). The category is still checked against
    the symbol map. ``clean_copy`` adds ``clean_ids``: the same sequence with every masked or
    replaced position holding its original token (method_spec §10 B5 fix: ITC and ITM read it).
    """
    category = record["category"]
    try:
        symbol_token = category_symbols[category.lower()]
    except KeyError:
        raise KeyError(
            f"category {category!r} ({category.lower()!r}) is not in the category-to-symbol map "
            "(categorys_to_sign.txt)"
        ) from None
    if not tokenizer.has_token(symbol_token):
        raise ValueError(f"symbol {symbol_token!r} of category {category!r} is not a vocab token")

    # Same draw order as the reference: description permutation and replacements, then the
    # attribute shuffle, synonym noise and the name/value coin.
    d_ids, d_target, d_replaced, d_orig, d_perm_targets = _corrupt_description(
        record["description"], tokenizer, lexicon, rng
    )
    a_ids, a_target, a_own = (_attribute_part(record, tokenizer, lexicon, rng) if attributes
                              else ([], [], []))

    prompt = tokenizer.wordpiece_ids(DESCRIPTION_PROMPT)
    head = [tokenizer.cls_id] + ([tokenizer.token_to_id(symbol_token)] if symbol else []) + prompt
    ids = head + d_ids + [tokenizer.sep_id] + a_ids
    is_target = [0] * len(head) + d_target + [0] + a_target
    replaced = [0] * len(head) + d_replaced + [0] + [0] * len(a_ids)
    own = [IGNORE_LABEL] * len(head) + d_orig + [IGNORE_LABEL] + a_own

    ids, is_target, replaced, own = ids[:max_len], is_target[:max_len], replaced[:max_len], own[:max_len]
    target_pos = [i for i, t in enumerate(is_target) if t]

    mask_labels = np.full((max_len,), IGNORE_LABEL, dtype=np.int32)
    if fix_mlm_labels:
        for p in target_pos:
            mask_labels[p] = own[p]
    else:
        # B2: description targets in permutation order, then the (aligned) attribute targets,
        # cut to the number of target positions left after truncation, assigned in position order.
        a_targets = [own_i for own_i, t in zip(a_own, a_target) if t]
        targets = (d_perm_targets + a_targets)[: len(target_pos)]
        for p, label in zip(target_pos, targets):
            mask_labels[p] = label

    input_ids, attention_mask = _pad(ids, max_len, tokenizer.pad_id)
    replace_labels = np.zeros((max_len,), dtype=np.int32)
    replace_labels[: len(replaced)] = replaced
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mask_labels": mask_labels,
        "replace_labels": replace_labels,
    }
    if clean_copy:
        clean = input_ids.copy()
        for p in target_pos:
            clean[p] = own[p]
        out["clean_ids"] = clean
    return out

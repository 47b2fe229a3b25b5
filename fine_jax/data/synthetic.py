"""FashionGen in miniature: a procedurally drawn fine-grained fashion set, deterministic from a seed.

Products are flat drawings of garments, shoes, bags and accessories. The category and
subcategory set the silhouette, colour and pattern fill it, and a few small local details
(pocket, zip, collar, logo patch, laces, ...) are drawn on top. Products come in *twin* groups:
two (or three) products of one subcategory and split that are identical except for exactly one
local detail, so global appearance alone cannot tell them apart - the fine-grained regime that
FashionGen retrieval is about, at a size a tiny ViT+BERT learns on a CPU.

Captions follow FashionGen's style and name every visual attribute; the files use FashionGen's
own HDF5 schema (:mod:`fine_jax.data.fashiongen`), so the real and the synthetic data share one
loader. :func:`ensure_dataset` builds the set once into a directory and reuses it afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import string
import tempfile
import uuid
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fine_jax.data.fashiongen import write_fashiongen_h5

GENERATOR = "fine_jax.data.synthetic"
GENERATOR_VERSION = 1

TRAIN_FILE = "fashiongen_synthetic_train.h5"
VALIDATION_FILE = "fashiongen_synthetic_validation.h5"
SPLIT_FILES = {"train": TRAIN_FILE, "validation": VALIDATION_FILE}
CATEGORY_SIGN_FILE = "categorys_to_sign.txt"
TWINS_FILE = "twins_{split}.json"
LEXICON_FILE = "lexicon.json"
VOCAB_FILE = "vocab.txt"
PRODUCTS_FILE = "products.json"
MANIFEST_FILE = "manifest.json"

DEFAULT_NUM_TRAIN = 1600
DEFAULT_NUM_VALIDATION = 400
DEFAULT_VIEWS = 3
DEFAULT_IMAGE_SIZE = 64

SYMBOL_TOKENS: tuple[str, ...] = (
    "[tops_sign]", "[pants_sign]", "[skirts_sign]", "[coats_sign]", "[dresses_sign]",
    "[shoes_sign]", "[bags_sign]", "[accessories_sign]", "[others_sign]",
)
# Vocab layout: [PAD] at 0, the symbols at 1-9 (as in the reference vocab), then these.
SPECIAL_TOKENS: tuple[str, ...] = ("[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Category (upper case, as in the release) -> symbol; the same mapping as the reference
# categorys_to_sign.txt for these categories.
CATEGORY_SYMBOLS: dict[str, str] = {
    "TOPS": "[tops_sign]", "SHIRTS": "[tops_sign]", "SWEATERS": "[tops_sign]",
    "PANTS": "[pants_sign]", "JEANS": "[pants_sign]", "SHORTS": "[pants_sign]",
    "SKIRTS": "[skirts_sign]",
    "JACKETS & COATS": "[coats_sign]",
    "DRESSES": "[dresses_sign]",
    "SNEAKERS": "[shoes_sign]", "BOOTS": "[shoes_sign]",
    "TOTE BAGS": "[bags_sign]", "BACKPACKS": "[bags_sign]",
    "HATS": "[accessories_sign]", "SCARVES": "[accessories_sign]",
    "SWIMWEAR": "[others_sign]",
}

# ----------------------------------------------------------------------------------------------
# Attributes
# ----------------------------------------------------------------------------------------------

# name -> (rgb, name of the pattern's second colour, ink). Ink is the colour of the details: light
# on dark garments and dark on light ones, so a detail is visible whatever the colour.
_DARK_INK = (25, 25, 28)
_LIGHT_INK = (242, 242, 236)
COLOURS: dict[str, tuple[tuple[int, int, int], str, tuple[int, int, int]]] = {
    "black": ((28, 28, 30), "red", _LIGHT_INK),
    "white": ((246, 246, 244), "navy", _DARK_INK),
    "navy": ((26, 38, 92), "red", _LIGHT_INK),
    "light blue": ((140, 188, 236), "navy", _DARK_INK),
    "red": ((200, 32, 42), "black", _LIGHT_INK),
    "dark green": ((24, 96, 50), "yellow", _LIGHT_INK),
    "yellow": ((240, 204, 44), "navy", _DARK_INK),
    "beige": ((214, 190, 150), "brown", _DARK_INK),
    "pink": ((240, 142, 182), "white", _DARK_INK),
    "grey": ((128, 128, 132), "black", _LIGHT_INK),
}
SECOND_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 32, 42), "navy": (26, 38, 92), "black": (28, 28, 30), "yellow": (240, 204, 44),
    "brown": (110, 70, 40), "white": (246, 246, 244),
}
_METAL = (206, 170, 62)

PATTERNS: tuple[str, ...] = ("solid", "stripes", "checks", "dots", "colorblock")
_PATTERN_NAME_ADJ = {"solid": "", "stripes": "striped", "checks": "checked", "dots": "polka dot",
                     "colorblock": "colorblocked"}


def _pattern_sentence(pattern: str, second: str) -> str:
    return {
        "solid": "Solid color throughout.",
        "stripes": f"Striped pattern in {second} throughout.",
        "checks": f"Check pattern in {second} throughout.",
        "dots": f"Polka dot pattern in {second} throughout.",
        "colorblock": f"Colorblocked panel in {second} at bottom.",
    }[pattern]


SEASONS: tuple[str, ...] = ("SS2017", "FW2016", "SS2018", "FW2017")
BRANDS: tuple[str, ...] = ("ATELIER NORD", "MAISON LUMEN", "KOBALT", "OSTRA", "HALDEN", "MIRO STUDIO",
                           "PALE FIELD", "VERN & CO")

_COMPOSITION = {
    "cotton": "100% cotton", "linen": "100% linen", "silk": "100% silk", "wool": "100% wool",
    "cashmere": "100% cashmere", "denim": "98% cotton, 2% elastane", "nylon": "100% nylon",
    "crepe": "100% polyester", "leather": "100% leather", "canvas": "100% cotton", "suede": "100% suede",
}
_SHOE_COMPOSITION = {"leather": "Upper: leather. Sole: rubber.", "canvas": "Upper: cotton. Sole: rubber.",
                     "suede": "Upper: suede. Sole: rubber."}


@dataclasses.dataclass(frozen=True)
class Subcategory:
    category: str
    subcategory: str
    noun: str              # singular noun used in the caption and the product name
    descriptor: str        # leading words of the first caption sentence ("Short sleeve")
    fabrics: tuple[str, ...]
    kind: str              # drawing family: upper, lower, skirt, swimsuit, shoe, bag, hat, scarf
    shape: Mapping[str, Any]
    details: tuple[str, ...]  # the local details valid for this subcategory, in caption order
    exclusive: tuple[tuple[str, str], ...] = ()  # details drawn at the same place
    gender: str | None = None  # fixed gender, or None for either
    department: str = "CLOTHING"

    @property
    def symbol(self) -> str:
        return CATEGORY_SYMBOLS[self.category]


_UPPER_DETAILS = ("chest pocket", "logo patch", "collar", "button placket", "cuffs", "zip")
_CLOSURES = (("button placket", "zip"),)

SUBCATEGORIES: tuple[Subcategory, ...] = (
    Subcategory("TOPS", "T-SHIRTS", "t-shirt", "Short sleeve", ("cotton", "linen"), "upper",
                dict(sleeve="short", hem=0.68), ("chest pocket", "logo patch", "collar", "button placket", "cuffs")),
    Subcategory("TOPS", "TANK TOPS", "tank top", "Sleeveless", ("cotton", "linen"), "upper",
                dict(sleeve="none", tank=True, hem=0.7, body=0.15),
                ("chest pocket", "logo patch", "trim", "drawstring")),
    Subcategory("SHIRTS", "SHIRTS", "shirt", "Long sleeve", ("cotton", "linen", "silk"), "upper",
                dict(sleeve="long", hem=0.74, body=0.16, shirttail=True), _UPPER_DETAILS, _CLOSURES),
    Subcategory("SHIRTS", "SHORT SLEEVE SHIRTS", "shirt", "Short sleeve", ("cotton", "linen", "silk"), "upper",
                dict(sleeve="short", hem=0.74, body=0.16, shirttail=True), _UPPER_DETAILS, _CLOSURES),
    Subcategory("SWEATERS", "CREWNECKS", "sweater", "Long sleeve", ("wool", "cotton", "cashmere"), "upper",
                dict(sleeve="long", hem=0.66, body=0.19, rib_hem=True, half_zip=True),
                ("logo patch", "chest pocket", "cuffs", "zip", "trim")),
    Subcategory("SWEATERS", "HOODIES & ZIPUPS", "hoodie", "Long sleeve hooded", ("cotton",), "upper",
                dict(sleeve="long", hem=0.74, body=0.18, hood=True, sy=0.27),
                ("zip", "drawstring", "logo patch", "cuffs", "chest pocket")),
    Subcategory("PANTS", "TROUSERS", "trousers", "Straight-leg", ("wool", "cotton"), "lower",
                dict(hem=0.9, hem_outer=0.19, hem_inner=0.035), ("belt", "zip", "logo patch", "cuffs", "patch pocket")),
    Subcategory("PANTS", "LOUNGE PANTS", "lounge pants", "Tapered", ("cotton",), "lower",
                dict(hem=0.88, hem_outer=0.14, hem_inner=0.05, top_half=0.19),
                ("drawstring", "logo patch", "cuffs", "patch pocket")),
    Subcategory("JEANS", "JEANS", "jeans", "Slim-fit", ("denim",), "lower",
                dict(hem=0.9, hem_outer=0.15, hem_inner=0.045, top_half=0.17),
                ("belt", "zip", "logo patch", "cuffs", "patch pocket")),
    Subcategory("SHORTS", "SHORTS", "shorts", "Relaxed-fit", ("cotton", "linen"), "lower",
                dict(hem=0.5, hem_outer=0.22, hem_inner=0.02, crotch=0.38),
                ("belt", "drawstring", "zip", "logo patch", "cuffs", "patch pocket"), (("belt", "drawstring"),)),
    Subcategory("SKIRTS", "SHORT SKIRTS", "skirt", "Short", ("cotton", "wool", "silk"), "skirt",
                dict(hem=0.52, hem_half=0.27), ("belt", "zip", "button placket", "logo patch", "patch pocket"),
                _CLOSURES, gender="WOMEN"),
    Subcategory("SKIRTS", "LONG SKIRTS", "skirt", "Long", ("cotton", "wool", "silk"), "skirt",
                dict(hem=0.9, hem_half=0.24), ("belt", "zip", "button placket", "logo patch", "patch pocket"),
                _CLOSURES, gender="WOMEN"),
    Subcategory("JACKETS & COATS", "BOMBERS", "bomber jacket", "Long sleeve", ("nylon", "wool"), "upper",
                dict(sleeve="long", hem=0.62, body=0.2, rib_hem=True),
                ("zip", "chest pocket", "logo patch", "cuffs", "collar")),
    Subcategory("JACKETS & COATS", "COATS", "coat", "Long sleeve", ("wool", "cashmere"), "upper",
                dict(sleeve="long", hem=0.9, body=0.18, hem_half=0.22),
                ("button placket", "zip", "belt", "collar", "chest pocket", "logo patch"), _CLOSURES),
    Subcategory("JACKETS & COATS", "DENIM JACKETS", "denim jacket", "Long sleeve", ("denim",), "upper",
                dict(sleeve="long", hem=0.6, body=0.19),
                ("button placket", "chest pocket", "collar", "logo patch", "cuffs")),
    Subcategory("DRESSES", "SHORT DRESSES", "dress", "Sleeveless short", ("cotton", "silk", "crepe"), "upper",
                dict(sleeve="none", tank=True, body=0.15, waist=0.47, hem=0.74, hem_half=0.26),
                ("belt", "collar", "zip", "button placket", "logo patch", "chest pocket"), _CLOSURES, gender="WOMEN"),
    Subcategory("DRESSES", "LONG DRESSES", "dress", "Sleeveless long", ("cotton", "silk", "crepe"), "upper",
                dict(sleeve="none", tank=True, body=0.15, waist=0.47, hem=0.93, hem_half=0.29),
                ("belt", "collar", "zip", "button placket", "logo patch", "chest pocket"), _CLOSURES, gender="WOMEN"),
    Subcategory("SNEAKERS", "LOW TOP SNEAKERS", "sneakers", "Low-top", ("leather", "canvas"), "shoe",
                dict(style="low"), ("laces", "logo patch", "contrast sole", "toe cap", "heel tab"), department="SHOES"),
    Subcategory("SNEAKERS", "HIGH TOP SNEAKERS", "sneakers", "High-top", ("leather", "canvas"), "shoe",
                dict(style="high"), ("laces", "logo patch", "contrast sole", "toe cap", "heel tab"),
                department="SHOES"),
    Subcategory("BOOTS", "ANKLE BOOTS", "ankle boots", "", ("leather", "suede"), "shoe",
                dict(style="ankle"), ("laces", "zip", "logo patch", "contrast sole", "toe cap", "heel tab"),
                department="SHOES"),
    Subcategory("BOOTS", "TALL BOOTS", "tall boots", "", ("leather", "suede"), "shoe",
                dict(style="tall"), ("laces", "zip", "logo patch", "contrast sole", "toe cap", "heel tab"),
                department="SHOES"),
    Subcategory("TOTE BAGS", "TOTE BAGS", "tote bag", "", ("leather", "canvas", "nylon"), "bag",
                dict(style="tote"), ("zip", "logo patch", "buckle strap", "front pocket"), department="BAGS"),
    Subcategory("BACKPACKS", "BACKPACKS", "backpack", "", ("nylon", "leather", "canvas"), "bag",
                dict(style="backpack"), ("zip", "logo patch", "buckle strap", "front pocket"), department="BAGS"),
    Subcategory("HATS", "CAPS", "cap", "", ("cotton", "wool"), "hat",
                dict(style="cap"), ("logo patch", "button top", "trim"), department="ACCESSORIES"),
    Subcategory("HATS", "BEANIES", "beanie", "Rib knit", ("wool", "cashmere"), "hat",
                dict(style="beanie"), ("logo patch", "pom pom", "trim"), department="ACCESSORIES"),
    Subcategory("SCARVES", "SCARVES", "scarf", "", ("wool", "cashmere", "silk"), "scarf",
                {}, ("fringe", "logo patch", "trim"), department="ACCESSORIES"),
    Subcategory("SWIMWEAR", "SWIM SHORTS", "swim shorts", "", ("nylon",), "lower",
                dict(hem=0.46, hem_outer=0.23, hem_inner=0.015, crotch=0.36, top_half=0.2),
                ("drawstring", "logo patch", "cuffs", "patch pocket"), gender="MEN"),
    Subcategory("SWIMWEAR", "SWIMSUITS", "swimsuit", "Sleeveless", ("nylon",), "swimsuit",
                {}, ("logo patch", "zip", "trim", "belt"), gender="WOMEN"),
)
SUBCATEGORY_BY_NAME: dict[str, Subcategory] = {s.subcategory: s for s in SUBCATEGORIES}

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

# ----------------------------------------------------------------------------------------------
# Products
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Product:
    product_id: int
    split: str
    group: int           # twin group; its members differ from the first member by one detail
    subcategory: str
    colour: str
    pattern: str
    details: tuple[str, ...]
    fabric: str
    gender: str
    season: str
    brand: str
    msrp_usd: float

    @property
    def spec(self) -> Subcategory:
        return SUBCATEGORY_BY_NAME[self.subcategory]

    @property
    def category(self) -> str:
        return self.spec.category

    @property
    def symbol(self) -> str:
        return self.spec.symbol

    @property
    def second_colour(self) -> str:
        return COLOURS[self.colour][1]

    @property
    def composition(self) -> str:
        if self.spec.kind == "shoe":
            return _SHOE_COMPOSITION[self.fabric]
        if self.spec.kind == "swimsuit" or self.subcategory == "SWIM SHORTS":
            return "80% nylon, 20% elastane"
        return _COMPOSITION[self.fabric]

    @property
    def name(self) -> str:
        adj = _PATTERN_NAME_ADJ[self.pattern]
        return " ".join(w for w in (adj, self.fabric, self.spec.noun) if w).title()

    def sentences(self) -> list[str]:
        sub = self.spec
        head = " ".join(w for w in (sub.descriptor, self.fabric, sub.noun) if w) + f" in {self.colour}."
        out = [head[0].upper() + head[1:], _pattern_sentence(self.pattern, self.second_colour)]
        out += [detail_sentence(sub, d) for d in self.details]
        out.append("Tonal stitching.")
        return out

    @property
    def description(self) -> str:
        return " ".join(self.sentences())

    @property
    def signature(self) -> tuple:
        """Everything that is visible: two products with one signature would be indistinguishable."""
        return (self.subcategory, self.colour, self.pattern, frozenset(self.details))

    def to_json(self) -> dict[str, Any]:
        return {
            "product_id": self.product_id, "split": self.split, "group": self.group,
            "category": self.category, "subcategory": self.subcategory, "symbol": self.symbol,
            "colour": self.colour, "pattern": self.pattern, "details": list(self.details),
            "fabric": self.fabric, "name": self.name, "description": self.description,
        }


def _compatible(sub: Subcategory, details: Iterable[str]) -> bool:
    s = set(details)
    return not any(a in s and b in s for a, b in sub.exclusive)


def _ordered(sub: Subcategory, details: Iterable[str]) -> tuple[str, ...]:
    s = set(details)
    return tuple(d for d in sub.details if d in s)


def _sample_details(rng: np.random.Generator, sub: Subcategory) -> tuple[str, ...]:
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    chosen: list[str] = []
    for i in rng.permutation(len(sub.details)):
        d = sub.details[int(i)]
        if len(chosen) < k and _compatible(sub, chosen + [d]):
            chosen.append(d)
    return _ordered(sub, chosen)


def _one_detail_edits(sub: Subcategory, details: tuple[str, ...]) -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """All detail sets one edit away, by kind of edit, each with a label of what differs."""
    have = set(details)
    edits: dict[str, list] = {"add": [], "remove": [], "swap": []}
    for d in sub.details:
        if d not in have and len(have) < 4 and _compatible(sub, have | {d}):
            edits["add"].append((_ordered(sub, have | {d}), d))
    if len(have) >= 2:
        for d in details:
            edits["remove"].append((_ordered(sub, have - {d}), d))
    for d in details:
        for e in sub.details:
            if e not in have and _compatible(sub, (have - {d}) | {e}):
                edits["swap"].append((_ordered(sub, (have - {d}) | {e}), f"{d} vs {e}"))
    return edits


def _split_bases(rng: np.random.Generator, n_groups: dict[str, int]) -> dict[str, list[tuple[int, int, int]]]:
    """Disjoint (subcategory, colour, pattern) combinations per split, subcategories interleaved.

    Validation gets combinations that never occur in training. Within a split the combinations
    are ordered round-robin over subcategories, so every subcategory is about equally frequent.
    """
    bases = [(s, c, p) for s in range(len(SUBCATEGORIES)) for c in range(len(COLOURS)) for p in range(len(PATTERNS))]
    perm = [bases[int(i)] for i in rng.permutation(len(bases))]
    total = sum(n_groups.values())
    n_val = int(round(len(bases) * n_groups["validation"] / total))
    n_val = min(max(n_val, 1), len(bases) - 1)
    split_bases = {"validation": perm[:n_val], "train": perm[n_val:]}
    out = {}
    for split, items in split_bases.items():
        by_sub: dict[int, list] = defaultdict(list)
        for b in items:
            by_sub[b[0]].append(b)
        subs = sorted(by_sub)
        order = [subs[int(i)] for i in rng.permutation(len(subs))]
        interleaved = []
        for r in range(max(len(v) for v in by_sub.values())):
            interleaved += [by_sub[s][r] for s in order if r < len(by_sub[s])]
        out[split] = interleaved
    return out


def _group_sizes(n: int, split: str) -> list[int]:
    if n < 2:
        raise ValueError(f"the {split} split needs at least 2 products (twin pairs), got {n}")
    sizes = [2] * (n // 2)
    if n % 2:
        sizes[-1] = 3
    return sizes


def make_products(seed: int, num_train: int = DEFAULT_NUM_TRAIN, num_validation: int = DEFAULT_NUM_VALIDATION
                  ) -> tuple[list[Product], dict[str, list[tuple[int, int, str]]]]:
    """The products of both splits (train first, each split in file order) and the twin pairs.

    Twin pairs are ``(product_id_a, product_id_b, what differs)``: the name of the detail that
    one of them has and the other lacks, or ``"x vs y"`` when ``a`` has ``x`` where ``b`` has ``y``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    sizes = {"train": _group_sizes(num_train, "train"), "validation": _group_sizes(num_validation, "validation")}
    bases = _split_bases(rng, {k: len(v) for k, v in sizes.items()})
    seen: set = set()
    group_id = 0
    per_split: dict[str, list[dict[str, Any]]] = {}
    pair_idx: dict[str, list[tuple[int, int, str]]] = {}
    for split in ("train", "validation"):
        items: list[dict[str, Any]] = []
        pairs: list[tuple[int, int, str]] = []
        for g, size in enumerate(sizes[split]):
            base_list = bases[split]
            for attempt in range(200):
                s_i, c_i, p_i = base_list[(g + attempt * 7919) % len(base_list)]
                sub = SUBCATEGORIES[s_i]
                colour, pattern = list(COLOURS)[c_i], PATTERNS[p_i]
                first = _sample_details(rng, sub)
                sets = [(first, "")]
                edits = _one_detail_edits(sub, first)
                kinds = [k for k in ("add", "remove", "swap") if edits[k]]
                for _ in range(size - 1):
                    if not kinds:
                        break
                    kind = kinds[int(rng.integers(len(kinds)))]
                    sets.append(edits[kind][int(rng.integers(len(edits[kind])))])
                sigs = [(sub.subcategory, colour, pattern, frozenset(d)) for d, _ in sets]
                if len(sets) == size and len(set(sigs)) == size and not seen.intersection(sigs):
                    break
            else:
                raise RuntimeError(f"could not draw {size} distinct products for a {split} twin group; "
                                   "the requested size exceeds what the attribute space holds")
            seen.update(sigs)
            common = dict(
                split=split, group=group_id, subcategory=sub.subcategory, colour=colour, pattern=pattern,
                fabric=sub.fabrics[int(rng.integers(len(sub.fabrics)))],
                gender=sub.gender or ("MEN", "WOMEN")[int(rng.integers(2))],
                season=SEASONS[int(rng.integers(len(SEASONS)))],
                brand=BRANDS[int(rng.integers(len(BRANDS)))],
                msrp_usd=float(rng.integers(8, 120) * 10 - 5),
            )
            start = len(items)
            for d, _ in sets:
                items.append(dict(common, details=d))
            for j, (_, what) in enumerate(sets[1:], start=1):
                pairs.append((start, start + j, what))
            group_id += 1
        per_split[split] = items
        pair_idx[split] = pairs

    n_total = num_train + num_validation
    ids = rng.choice(np.arange(10000, 10000 + 20 * n_total), size=n_total, replace=False)
    split_ids = {"train": np.sort(ids[:num_train]), "validation": np.sort(ids[num_train:])}
    products: list[Product] = []
    twins: dict[str, list[tuple[int, int, str]]] = {}
    for split in ("train", "validation"):
        items = per_split[split]
        order = rng.permutation(len(items))  # file order; keeps twins apart in the file
        pid_of = np.empty(len(items), dtype=np.int64)
        for pos, i in enumerate(order):
            pid_of[int(i)] = int(split_ids[split][pos])
        for i in order:
            products.append(Product(product_id=int(pid_of[int(i)]), **items[int(i)]))
        twins[split] = [(int(pid_of[a]), int(pid_of[b]), what) for a, b, what in pair_idx[split]]
    return products, twins


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------
# Shapes are laid out in unit coordinates (x right, y down, garment centred in [0.08, 0.92]).
# A drawing is a list of primitives; "fill" names a role colour resolved per product:
#   base (garment colour, pattern applied only to the silhouette), shade (darker base),
#   ink (detail colour), metal (hardware), outline.

def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx, cy, rx, ry, a0=0.0, a1=360.0, n=24):
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(a0, a1, n, endpoint=a1 - a0 < 360)]


def _lerp(p, q, t):
    return (p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t)


def _mirror(pts, c=0.5):
    return [(2 * c - x, y) for x, y in pts]


def _x_at(p, q, y):
    if q[1] == p[1]:
        return p[0]
    return p[0] + (q[0] - p[0]) * (y - p[1]) / (q[1] - p[1])


def _zip(x, y0, y1):
    return [("line", [(x, y0), (x, y1)], "ink", 3),
            ("poly", _rect(x - 0.016, y0 - 0.005, x + 0.016, y0 + 0.05), "metal", "ink")]


def _placket(x, y0, y1, n=5):
    prims = [("line", [(x - 0.014, y0), (x - 0.014, y1)], "ink", 1),
             ("line", [(x + 0.014, y0), (x + 0.014, y1)], "ink", 1)]
    for t in np.linspace(0.08, 0.92, n):
        prims.append(("dot", (x, y0 + (y1 - y0) * t), 0.014, "ink", None))
    return prims


def _logo(cx, cy, r=0.032):
    return [("poly", _rect(cx - r, cy - r, cx + r, cy + r), "ink", None),
            ("poly", _rect(cx - r * 0.35, cy - r * 0.35, cx + r * 0.35, cy + r * 0.35), "base", None)]


def _pocket(x0, y0, x1, y1):
    return [("poly", _rect(x0, y0, x1, y1), "shade", "ink"), ("line", [(x0, y0 + 0.022), (x1, y0 + 0.022)], "ink", 1)]


def _knotted(p, q):
    return [("line", [p, q], "ink", 2), ("dot", q, 0.012, "ink", None)]


def _upper(sleeve="short", hem=0.68, body=0.17, hem_half=None, hood=False, tank=False, waist=None,
           shirttail=False, rib_hem=False, half_zip=False, sy=0.2):
    c = 0.5
    hem_half = body if hem_half is None else hem_half
    if tank:
        neck_top, neck_w, dip = sy - 0.03, 0.075, sy + 0.09
        right = [(c, dip), (c + neck_w, neck_top), (c + 0.12, neck_top), (c + body, sy + 0.16)]
    else:
        neck_top, neck_w, dip = sy - 0.02, 0.07, sy + 0.045
        right = [(c, dip), (c + 0.04, sy + 0.03), (c + neck_w, neck_top), (c + body + 0.04, sy + 0.01),
                 (c + body, sy + 0.15)]
    armpit = right[-1]
    if waist is not None:
        right.append((c + body - 0.03, waist))
    right.append((c + hem_half, hem))
    poly = right + ([(c, hem + 0.035)] if shirttail else []) + _mirror(right[1:])[::-1]
    back, polys, lines = [], [poly], []
    details: dict[str, list] = {}
    if hood:
        back.append(("poly", _ellipse(c, sy - 0.05, 0.1, 0.11), "base", "outline"))
        lines.append(("poly", _ellipse(c, sy - 0.035, 0.055, 0.065), "shade", "outline"))
    cuffs = []
    if sleeve != "none":
        a, b = (c + body + 0.04, sy + 0.01), armpit
        if sleeve == "short":
            cc, dd, f = (c + body + 0.15, sy + 0.15), (c + body + 0.08, sy + 0.22), 0.75
        else:
            cc, dd, f = (c + body + 0.13, sy + 0.52), (c + body + 0.05, sy + 0.53), 0.86
        sl = [a, cc, dd, b]
        polys += [sl, _mirror(sl)]
        cuff = [_lerp(a, cc, f), cc, dd, _lerp(b, dd, f)]
        cuffs = [("poly", cuff, "ink", None), ("poly", _mirror(cuff), "ink", None)]

    def half_width(y):
        side = right[right.index(armpit):]  # armpit, [waist], hem corner
        for p, q in zip(side, side[1:]):
            if p[1] <= y <= q[1]:
                return _x_at(p, q, y) - c
        return body

    if rib_hem:
        lines.append(("line", [(c - hem_half, hem - 0.045), (c + hem_half, hem - 0.045)], "outline", 2))
    details["chest pocket"] = _pocket(c - 0.125, sy + 0.11, c - 0.045, sy + 0.2)
    details["logo patch"] = _logo(c + 0.09, sy + 0.13)
    details["button placket"] = _placket(c, dip + 0.015, hem - 0.03)
    details["zip"] = _zip(c, dip + 0.015, sy + 0.26 if half_zip else hem - 0.03)
    tri = [(c + 0.004, dip), (c + neck_w, neck_top), (c + neck_w + 0.028, dip + 0.035)]
    details["collar"] = [("poly", tri, "ink", None), ("poly", _mirror(tri), "ink", None)]
    details["cuffs"] = cuffs
    if hood:
        details["drawstring"] = (_knotted((c - 0.03, dip - 0.01), (c - 0.04, dip + 0.16))
                                 + _knotted((c + 0.03, dip - 0.01), (c + 0.04, dip + 0.16)))
    else:
        details["drawstring"] = (_knotted((c - 0.035, hem - 0.03), (c - 0.055, hem + 0.07))
                                 + _knotted((c + 0.035, hem - 0.03), (c + 0.055, hem + 0.07)))
    by = waist if waist is not None else sy + 0.33
    bw = half_width(by)
    details["belt"] = [("poly", _rect(c - bw, by - 0.025, c + bw, by + 0.025), "ink", None),
                       ("poly", _rect(c - 0.032, by - 0.037, c + 0.032, by + 0.037), "metal", "ink")]
    if rib_hem:
        details["trim"] = [("poly", _rect(c - hem_half, hem - 0.045, c + hem_half, hem), "ink", None)]
    else:
        details["trim"] = [("line", [(c - neck_w, neck_top), (c, dip), (c + neck_w, neck_top)], "ink", 4)]
    block_y = (armpit[1] + hem) / 2
    return dict(back=back, polys=polys, lines=lines, details=details, block_y=block_y)


def _lower(hem=0.9, top_half=0.18, hem_outer=0.19, hem_inner=0.035, crotch=0.42):
    c, y0 = 0.5, 0.12
    poly = [(c - top_half, y0), (c + top_half, y0), (c + hem_outer, hem), (c + hem_inner, hem), (c, crotch),
            (c - hem_inner, hem), (c - hem_outer, hem)]
    lines = [("line", [(c - top_half, y0 + 0.05), (c + top_half, y0 + 0.05)], "outline", 2)]
    yc = hem - 0.05
    xo = _x_at((c + top_half, y0), (c + hem_outer, hem), yc)
    xi = _x_at((c, crotch), (c + hem_inner, hem), yc)
    cuff = [(xi, yc), (xo, yc), (c + hem_outer, hem), (c + hem_inner, hem)]
    details = _waist_details(c, y0, top_half)
    details["zip"] = _zip(c, y0 + 0.055, min(crotch - 0.04, y0 + 0.22))
    details["cuffs"] = [("poly", cuff, "ink", None), ("poly", _mirror(cuff), "ink", None)]
    return dict(back=[], polys=[poly], lines=lines, details=details, block_y=(crotch + hem) / 2)


def _waist_details(c, y0, top_half):
    return {
        "belt": [("poly", _rect(c - top_half - 0.005, y0 - 0.005, c + top_half + 0.005, y0 + 0.05), "ink", None),
                 ("poly", _rect(c - 0.032, y0 - 0.012, c + 0.032, y0 + 0.062), "metal", "ink")],
        "drawstring": (_knotted((c - 0.02, y0 + 0.03), (c - 0.045, y0 + 0.17))
                       + _knotted((c + 0.02, y0 + 0.03), (c + 0.045, y0 + 0.17))),
        "logo patch": _logo(c + 0.1, y0 + 0.12),
        "patch pocket": _pocket(c - 0.15, y0 + 0.09, c - 0.06, y0 + 0.18),
    }


def _skirt(hem=0.52, hem_half=0.27, top_half=0.18):
    c, y0 = 0.5, 0.12
    poly = [(c - top_half, y0), (c + top_half, y0), (c + hem_half, hem), (c - hem_half, hem)]
    lines = [("line", [(c - top_half, y0 + 0.05), (c + top_half, y0 + 0.05)], "outline", 2)]
    details = _waist_details(c, y0, top_half)
    details["zip"] = _zip(c, y0 + 0.055, y0 + 0.26)
    details["button placket"] = _placket(c, y0 + 0.055, hem - 0.03)
    return dict(back=[], polys=[poly], lines=lines, details=details, block_y=(y0 + hem) / 2)


def _swimsuit():
    c = 0.5
    right = [(c, 0.3), (c + 0.06, 0.16), (c + 0.12, 0.16), (c + 0.16, 0.4), (c + 0.12, 0.56), (c + 0.16, 0.74),
             (c + 0.06, 0.76)]
    poly = right + [(c, 0.68)] + _mirror(right[1:])[::-1]
    details = {
        "logo patch": _logo(c + 0.07, 0.42),
        "zip": _zip(c, 0.315, 0.48),
        "trim": [("line", [(c - 0.06, 0.16), (c, 0.3), (c + 0.06, 0.16)], "ink", 4)],
        "belt": [("poly", _rect(c - 0.135, 0.53, c + 0.135, 0.58), "ink", None),
                 ("poly", _rect(c - 0.032, 0.518, c + 0.032, 0.592), "metal", "ink")],
    }
    return dict(back=[], polys=[poly], lines=[], details=details, block_y=0.56)


_SHOES = {
    # upper outline (heel, back top, ..., toe), sole start x, lace line (from, to)
    "low": ([(0.12, 0.70), (0.13, 0.50), (0.22, 0.46), (0.34, 0.50), (0.44, 0.42), (0.5, 0.46), (0.66, 0.55),
             (0.82, 0.6), (0.89, 0.65), (0.9, 0.70)], 0.10, ((0.4, 0.46), (0.62, 0.55))),
    "high": ([(0.12, 0.70), (0.13, 0.22), (0.36, 0.22), (0.38, 0.40), (0.5, 0.46), (0.66, 0.55), (0.82, 0.6),
              (0.89, 0.65), (0.9, 0.70)], 0.10, ((0.37, 0.26), (0.56, 0.5))),
    "ankle": ([(0.14, 0.70), (0.15, 0.28), (0.42, 0.28), (0.43, 0.47), (0.6, 0.53), (0.8, 0.58), (0.88, 0.64),
               (0.89, 0.70)], 0.12, ((0.43, 0.32), (0.58, 0.52))),
    "tall": ([(0.2, 0.70), (0.21, 0.06), (0.43, 0.06), (0.44, 0.5), (0.62, 0.55), (0.8, 0.6), (0.87, 0.65),
              (0.88, 0.70)], 0.18, ((0.44, 0.3), (0.6, 0.55))),
}


def _shoe(style="low"):
    upper, x0, (l0, l1) = _SHOES[style]
    back_x = upper[1][0]
    top_y = upper[1][1]
    boot = style in ("ankle", "tall")
    sole = ([(x0, 0.70), (0.91, 0.70), (0.91, 0.75), (0.46, 0.76), (0.44, 0.81), (x0 + 0.01, 0.81), (x0, 0.79)] if boot
            else [(x0, 0.70), (0.91, 0.70), (0.91, 0.74), (0.87, 0.78), (x0 + 0.04, 0.78), (x0, 0.76)])
    dx, dy = l1[0] - l0[0], l1[1] - l0[1]
    norm = math.hypot(dx, dy)
    nx, ny = -dy / norm * 0.035, dx / norm * 0.035
    laces = []
    for t in (0.12, 0.4, 0.68, 0.92):
        m = _lerp(l0, l1, t)
        laces.append(("line", [(m[0] - nx, m[1] - ny), (m[0] + nx, m[1] + ny)], "ink", 3))
    toe = [(0.76, _top_y_at(upper, 0.76)), (0.82, _top_y_at(upper, 0.82)), (upper[-2][0], upper[-2][1]),
           (upper[-1][0], upper[-1][1]), (0.76, 0.70)]
    details = {
        "laces": laces,
        "logo patch": _logo(0.56 if not boot else 0.3, 0.63 if not boot else 0.55, 0.03),
        "contrast sole": [("poly", sole, "ink", "outline")],
        "toe cap": [("poly", toe, "ink", None)],
        "heel tab": [("poly", _rect(back_x - 0.02, top_y - 0.055, back_x + 0.035, top_y + 0.04), "ink", None)],
        "zip": _zip(back_x + 0.035, top_y + 0.04, 0.62),
    }
    return dict(back=[], polys=[upper], lines=[], details=details, block_y=0.58,
                sole=[("poly", sole, "shade", "outline")])


def _top_y_at(outline, x):
    """y of the top edge of a shoe outline (left to right along its upper part) at abscissa x."""
    pts = outline[2:]
    for p, q in zip(pts, pts[1:]):
        if p[0] <= x <= q[0]:
            return p[1] + (q[1] - p[1]) * (x - p[0]) / (q[0] - p[0])
    return pts[-1][1]


def _bag(style="tote"):
    c = 0.5
    if style == "tote":
        body = [(0.2, 0.38), (0.8, 0.38), (0.84, 0.86), (0.16, 0.86)]
        back = [("line", _ellipse(c, 0.38, 0.17, 0.22, 180, 360, 16), "shade", 5)]
        top = 0.38
        details = {
            "zip": [("line", [(0.25, 0.44), (0.75, 0.44)], "ink", 3),
                    ("poly", _rect(0.69, 0.43, 0.72, 0.5), "metal", "ink")],
            "logo patch": _logo(0.3, 0.53),
            "buckle strap": [("poly", _rect(0.47, top, 0.53, 0.62), "ink", None),
                             ("poly", _rect(0.455, 0.56, 0.545, 0.63), "metal", "ink")],
            "front pocket": _pocket(0.32, 0.66, 0.68, 0.8),
        }
    else:
        body = [(0.3, 0.2), (0.7, 0.2), (0.74, 0.25), (0.74, 0.84), (0.7, 0.88), (0.3, 0.88), (0.26, 0.84),
                (0.26, 0.25)]
        back = [("poly", _rect(0.2, 0.28, 0.27, 0.8), "shade", "outline"),
                ("poly", _rect(0.73, 0.28, 0.8, 0.8), "shade", "outline"),
                ("line", [(0.42, 0.21), (0.44, 0.12), (0.56, 0.12), (0.58, 0.21)], "shade", 4)]
        details = {
            "zip": [("line", [(0.3, 0.3), (0.7, 0.3)], "ink", 3),
                    ("poly", _rect(0.64, 0.29, 0.67, 0.36), "metal", "ink")],
            "logo patch": _logo(0.35, 0.42),
            "buckle strap": [("poly", _rect(0.47, 0.2, 0.53, 0.5), "ink", None),
                             ("poly", _rect(0.455, 0.45, 0.545, 0.52), "metal", "ink")],
            "front pocket": _pocket(0.34, 0.6, 0.66, 0.8),
        }
    return dict(back=back, polys=[body], lines=[], details=details, block_y=0.66)


def _hat(style="cap"):
    if style == "cap":
        dome = _ellipse(0.46, 0.6, 0.24, 0.28, 180, 360, 20)
        brim = [(0.6, 0.56), (0.88, 0.58), (0.9, 0.62), (0.66, 0.65), (0.5, 0.62)]
        details = {
            "logo patch": _logo(0.45, 0.47),
            "button top": [("dot", (0.46, 0.33), 0.028, "ink", None)],
            "trim": [("poly", _rect(0.225, 0.55, 0.695, 0.6), "ink", None)],
        }
        return dict(back=[], polys=[dome, brim], lines=[], details=details, block_y=0.5)
    dome = _ellipse(0.5, 0.6, 0.22, 0.36, 180, 360, 20)
    cuff = _rect(0.27, 0.58, 0.73, 0.76)
    details = {
        "logo patch": _logo(0.5, 0.44),
        "pom pom": [("dot", (0.5, 0.2), 0.06, "ink", None)],
        "trim": [("poly", cuff, "ink", "outline")],
    }
    return dict(back=[], polys=[dome, cuff], lines=[("line", [(0.28, 0.58), (0.72, 0.58)], "outline", 2)],
                details=details, block_y=0.5)


def _scarf():
    # laid flat on the diagonal, so that it reads as neither trousers nor a bag
    p0, p1, half = (0.24, 0.78), (0.76, 0.22), 0.11
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    n = math.hypot(dx, dy)
    ox, oy = -dy / n * half, dx / n * half
    band = [(p0[0] + ox, p0[1] + oy), (p1[0] + ox, p1[1] + oy), (p1[0] - ox, p1[1] - oy), (p0[0] - ox, p0[1] - oy)]
    ux, uy = dx / n, dy / n
    fringe = []
    for end, sign in ((p0, -1.0), (p1, 1.0)):
        for t in np.linspace(-0.8, 0.8, 5):
            x, y = end[0] + ox * t, end[1] + oy * t
            fringe.append(("line", [(x, y), (x + sign * ux * 0.05, y + sign * uy * 0.05)], "ink", 2))
    trim = [("line", [band[0], band[1]], "ink", 3), ("line", [band[2], band[3]], "ink", 3)]
    lc = _lerp(p0, p1, 0.2)
    details = {"fringe": fringe, "logo patch": _logo(lc[0], lc[1]), "trim": trim}
    return dict(back=[], polys=[band], lines=[], details=details, block_y=0.5)


_BUILDERS = {"upper": _upper, "lower": _lower, "skirt": _skirt, "swimsuit": _swimsuit, "shoe": _shoe, "bag": _bag,
             "hat": _hat, "scarf": _scarf}
_GEOMETRY_CACHE: dict[str, dict[str, Any]] = {}


_FRAME_FILL = 0.8  # the largest side of an item (details included) spans this fraction of the image
_MAX_ZOOM = 1.35   # small items (caps, shorts) are enlarged at most this much, keeping some size cue


def _prim_points(prim) -> list[tuple[float, float]]:
    if prim[0] == "dot":
        (x, y), r = prim[1], prim[2]
        return [(x - r, y - r), (x + r, y + r)]
    return list(prim[1])


def geometry(sub: Subcategory) -> dict[str, Any]:
    """The drawing of a subcategory in unit coordinates, with the frame that centres it."""
    if sub.subcategory not in _GEOMETRY_CACHE:
        g = _BUILDERS[sub.kind](**sub.shape)
        missing = [d for d in sub.details if not g["details"].get(d)]
        if missing:
            raise AssertionError(f"{sub.subcategory}: no drawing for details {missing}")
        pts = [pt for poly in g["polys"] for pt in poly]
        for prim in g["back"] + g["lines"] + g.get("sole", []) + [q for d in sub.details for q in g["details"][d]]:
            pts += _prim_points(prim)
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        side = max(max(xs) - min(xs), max(ys) - min(ys))
        g["frame"] = (float(min(xs) + max(xs)) / 2, float(min(ys) + max(ys)) / 2,
                      float(min(_FRAME_FILL / side, _MAX_ZOOM)))
        _GEOMETRY_CACHE[sub.subcategory] = g
    return _GEOMETRY_CACHE[sub.subcategory]


class _Canvas:
    """Maps unit coordinates to pixels: the item's frame, then one view's scale and shift."""

    def __init__(self, size: int, frame: tuple[float, float, float], scale: float, shift: tuple[float, float]):
        self.size, self.centre, self.scale, self.shift = size, frame[:2], frame[2] * scale, shift

    def pts(self, pts):
        s, (cx, cy), (tx, ty), n = self.scale, self.centre, self.shift, self.size
        return [(((x - cx) * s + 0.5 + tx) * n, ((y - cy) * s + 0.5 + ty) * n) for x, y in pts]

    def unit_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit coordinates of the pixel centres: x as a (1, size) row, y as a (size, 1) column."""
        t = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size - 0.5
        s = np.float32(self.scale)
        u = (t - np.float32(self.shift[0])) / s + np.float32(self.centre[0])
        v = (t - np.float32(self.shift[1])) / s + np.float32(self.centre[1])
        return u[None, :], v[:, None]

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.size / 128 * self.scale)))

    def draw(self, d: ImageDraw.ImageDraw, prim, colours: Mapping[str, tuple[int, int, int]]):
        kind = prim[0]
        if kind == "poly":
            _, pts, fill, outline = prim
            d.polygon(self.pts(pts), fill=colours[fill] if fill else None,
                      outline=colours[outline] if outline else None, width=self.width(2) if outline else 0)
        elif kind == "line":
            _, pts, fill, w = prim
            d.line(self.pts(pts), fill=colours[fill], width=self.width(w), joint="curve")
        elif kind == "dot":
            _, centre, r, fill, outline = prim
            (x, y), = self.pts([centre])
            rp = r * self.scale * self.size
            d.ellipse([x - rp, y - rp, x + rp, y + rp], fill=colours[fill],
                      outline=colours[outline] if outline else None)
        else:
            raise ValueError(kind)


def _view_params(seed: int, group: int, view: int) -> dict[str, Any]:
    # Keyed by twin group, not product: the twins of a group share every view's jitter, so their
    # images differ only where the differing detail is drawn.
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, group, view]))
    g = int(rng.integers(206, 236))
    tint = rng.integers(-4, 5, size=3)
    return dict(
        scale=float(rng.uniform(0.9, 1.02)),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        background=tuple(int(g + t) for t in tint),
        brightness=float(rng.uniform(0.93, 1.06)),
        gradient=float(rng.uniform(-0.06, 0.06)),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
    )


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, block_y: float) -> np.ndarray | None:
    if pattern == "solid":
        return None
    if pattern == "stripes":
        return np.mod(v / 0.09, 1.0) < 0.45
    if pattern == "checks":
        return (np.mod(u / 0.1, 1.0) < 0.32) | (np.mod(v / 0.1, 1.0) < 0.32)
    if pattern == "dots":
        row = np.floor(v / 0.09)
        uu = np.mod((u + np.mod(row, 2) * 0.045) / 0.09, 1.0) - 0.5
        vv = np.mod(v / 0.09, 1.0) - 0.5
        return uu * uu + vv * vv < 0.24 ** 2
    if pattern == "colorblock":
        return v > block_y
    raise ValueError(f"unknown pattern {pattern!r}")


def render(product: Product, view: int, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """One view of a product, ``(image_size, image_size, 3)`` uint8. Drawn at 2x and box-filtered."""
    p = _view_params(seed, product.group, view)
    size = 2 * image_size
    geom = geometry(product.spec)
    canvas = _Canvas(size, geom["frame"], p["scale"], p["shift"])
    rgb, second, ink = COLOURS[product.colour]
    base = np.array(rgb, dtype=np.float32)
    colours = {
        "base": rgb, "ink": ink, "metal": _METAL,
        "shade": tuple(int(x) for x in np.clip(base * 0.78 + 8, 0, 255)),
        "outline": tuple(int(x) for x in np.clip(base * 0.5, 0, 255)),
    }
    img = Image.new("RGB", (size, size), p["background"])
    d = ImageDraw.Draw(img)
    for prim in geom["back"]:
        canvas.draw(d, prim, colours)
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    for poly in geom["polys"]:
        md.polygon(canvas.pts(poly), fill=255)
    fill = np.empty((size, size, 3), dtype=np.uint8)
    fill[:] = rgb
    # the pattern moves and scales with the item: it is laid out in the item's unit coordinates
    u, v = canvas.unit_grid()
    pm = _pattern_mask(product.pattern, u, v, geom["block_y"])
    if pm is not None:
        fill[np.broadcast_to(pm, (size, size))] = SECOND_COLOURS[second]
    img.paste(Image.fromarray(fill), (0, 0), mask)
    for poly in geom["polys"]:
        d.polygon(canvas.pts(poly), outline=colours["outline"], width=canvas.width(2))
    for prim in geom.get("sole", []):
        if "contrast sole" not in product.details:
            canvas.draw(d, prim, colours)
    for prim in geom["lines"]:
        canvas.draw(d, prim, colours)
    for det in product.details:
        for prim in geom["details"][det]:
            canvas.draw(d, prim, colours)
    img = img.reduce(2)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    t = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    light = (np.float32(p["brightness"]) + np.float32(p["gradient"])
             * (np.float32(math.cos(p["gradient_angle"])) * t[None, :]
                + np.float32(math.sin(p["gradient_angle"])) * t[:, None]))
    return np.clip(np.rint(arr * light[:, :, None]), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Vocab
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Dataset files
# ----------------------------------------------------------------------------------------------


def _sizes(num_train: int, num_validation: int, views: int, image_size: int) -> dict[str, int]:
    for name, v, lo in (("num_train", num_train, 2), ("num_validation", num_validation, 2), ("views", views, 1),
                        ("image_size", image_size, 16)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return {"num_train": int(num_train), "num_validation": int(num_validation), "views": int(views),
            "image_size": int(image_size)}


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def generate_dataset(out_dir: str | os.PathLike, seed: int = 0, *, num_train: int = DEFAULT_NUM_TRAIN,
                     num_validation: int = DEFAULT_NUM_VALIDATION, views: int = DEFAULT_VIEWS,
                     image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, Any]:
    """Writes the whole dataset into ``out_dir`` (not atomically; see :func:`ensure_dataset`).

    Returns the manifest, which is written last. Every file is a pure function of the seed and
    sizes: the same arguments give byte-identical files.
    """
    sizes = _sizes(num_train, num_validation, views, image_size)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    products, twins = make_products(seed, num_train, num_validation)
    counts: dict[str, Any] = {}
    for split, fname in SPLIT_FILES.items():
        rows = []
        for p in (q for q in products if q.split == split):
            desc = p.description
            for v in range(views):
                rows.append(dict(
                    image=render(p, v, image_size, seed), description=desc, category=p.category,
                    subcategory=p.subcategory, composition=p.composition, gender=p.gender, name=p.name,
                    season=p.season, brand=p.brand, concat_description=f"{p.name}. {desc}",
                    department=p.spec.department, pose=f"id_gridfs_{v + 1}", product_id=p.product_id,
                    msrp_usd=p.msrp_usd, index=len(rows), index_2=v,
                ))
        write_fashiongen_h5(out / fname, rows, image_size)
        with open(out / TWINS_FILE.format(split=split), "w", encoding="utf-8") as f:  # one pair a line
            f.write("[\n" + ",\n".join(json.dumps(list(t)) for t in twins[split]) + "\n]\n")
        counts[split] = {"products": len(rows) // views, "images": len(rows), "twin_pairs": len(twins[split])}
    with open(out / CATEGORY_SIGN_FILE, "w", encoding="utf-8", newline="\n") as f:
        for cat, sym in CATEGORY_SYMBOLS.items():
            f.write(f"{cat.lower()}\t{sym}\n")
    _write_json(out / LEXICON_FILE, LEXICON)
    _write_json(out / PRODUCTS_FILE, [p.to_json() for p in products])
    texts = vocab_texts(products)
    vocab = build_vocab(texts)
    (out / VOCAB_FILE).write_text("\n".join(vocab) + "\n", encoding="utf-8")
    n_unk = count_unknown(out / VOCAB_FILE, texts)
    if n_unk:
        raise RuntimeError(f"the generated vocab leaves {n_unk} [UNK] pieces in the dataset's texts")
    counts.update(categories=len({p.category for p in products}), subcategories=len({p.subcategory for p in products}),
                  vocab_size=len(vocab))
    manifest = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": int(seed), "sizes": sizes, "counts": counts,
        "files": {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "vocab": VOCAB_FILE,
                  "category_signs": CATEGORY_SIGN_FILE, "lexicon": LEXICON_FILE, "products": PRODUCTS_FILE,
                  "twins": {s: TWINS_FILE.format(split=s) for s in SPLIT_FILES}},
    }
    _write_json(out / MANIFEST_FILE, manifest)
    return manifest


def _read_manifest(root: pathlib.Path) -> dict[str, Any] | None:
    try:
        with open(root / MANIFEST_FILE, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _matches(manifest: Mapping[str, Any] | None, seed: int, sizes: Mapping[str, int]) -> bool:
    return (manifest is not None and manifest.get("generator") == GENERATOR
            and manifest.get("version") == GENERATOR_VERSION and manifest.get("seed") == seed
            and manifest.get("sizes") == dict(sizes))


def ensure_dataset(root: str | os.PathLike, seed: int = 0, *, num_train: int = DEFAULT_NUM_TRAIN,
                   num_validation: int = DEFAULT_NUM_VALIDATION, views: int = DEFAULT_VIEWS,
                   image_size: int = DEFAULT_IMAGE_SIZE) -> pathlib.Path:
    """The synthetic dataset in ``root``, generated on first use; returns ``root``.

    An existing dataset is reused when its manifest matches the seed, sizes and generator version.
    Otherwise the set is generated into a temporary directory beside ``root`` and renamed into
    place, so ``root`` never holds a half-written dataset; when several processes race, one
    rename wins and the others reuse its result. A stale synthetic dataset in ``root`` is replaced;
    a non-empty ``root`` that is not a synthetic dataset is left alone (ValueError).
    """
    sizes = _sizes(num_train, num_validation, views, image_size)
    root = pathlib.Path(root)
    if _matches(_read_manifest(root), seed, sizes):
        return root
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"{root} exists and is not a directory")
        old = _read_manifest(root)
        if any(root.iterdir()) and (old is None or old.get("generator") != GENERATOR):
            raise ValueError(f"{root} is not empty and holds no synthetic dataset manifest; "
                             "refusing to overwrite it (choose an empty or new directory)")
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"fine_jax: generating the synthetic FashionGen set in {root} ({sizes['num_train']}+"
          f"{sizes['num_validation']} products x {sizes['views']} views, {sizes['image_size']} px, seed {seed})",
          flush=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_dataset(tmp, seed, **sizes)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the dataset is meant to be shared
        _install(tmp, root, seed, sizes)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _install(tmp: pathlib.Path, root: pathlib.Path, seed: int, sizes: Mapping[str, int]) -> None:
    try:
        os.rename(tmp, root)  # succeeds when root is absent or an empty directory
        return
    except OSError:
        pass
    if _matches(_read_manifest(root), seed, sizes):
        return  # another process installed the same dataset first
    old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(root, old)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, root)
    except OSError:
        if not _matches(_read_manifest(root), seed, sizes):
            raise
    finally:
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


def load_twins(root: str | os.PathLike, split: str = "validation") -> list[tuple[int, int, str]]:
    with open(pathlib.Path(root) / TWINS_FILE.format(split=split), encoding="utf-8") as f:
        return [(int(a), int(b), str(w)) for a, b, w in json.load(f)]


def split_path(root: str | os.PathLike, split: str) -> pathlib.Path:
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    return pathlib.Path(root) / SPLIT_FILES[split]

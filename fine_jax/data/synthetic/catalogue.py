"""The catalogue of the synthetic set: categories, attributes and the products drawn from them.

Products are flat drawings of garments, shoes, bags and accessories. The category and
subcategory set the silhouette, colour and pattern fill it, and a few small local details
(pocket, zip, collar, logo patch, laces, ...) are drawn on top. Products come in *twin* groups:
two (or three) products of one subcategory and split that are identical except for exactly one
local detail, so global appearance alone cannot tell them apart - the fine-grained regime that
FashionGen retrieval is about, at a size a tiny ViT+BERT learns on a CPU.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fine_jax.data.synthetic.captions import description_sentences

DEFAULT_NUM_TRAIN = 1600
DEFAULT_NUM_VALIDATION = 400

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

PATTERNS: tuple[str, ...] = ("solid", "stripes", "checks", "dots", "colorblock")
# The pattern's word in product names ("Striped Cotton Shirt").
PATTERN_ADJECTIVES = {"solid": "", "stripes": "striped", "checks": "checked", "dots": "polka dot",
                      "colorblock": "colorblocked"}

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
        adj = PATTERN_ADJECTIVES[self.pattern]
        return " ".join(w for w in (adj, self.fabric, self.spec.noun) if w).title()

    def sentences(self) -> list[str]:
        return description_sentences(self)

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


def compatible_details(sub: Subcategory, details: Iterable[str]) -> bool:
    s = set(details)
    return not any(a in s and b in s for a, b in sub.exclusive)


def ordered_details(sub: Subcategory, details: Iterable[str]) -> tuple[str, ...]:
    s = set(details)
    return tuple(d for d in sub.details if d in s)


def sample_details(rng: np.random.Generator, sub: Subcategory) -> tuple[str, ...]:
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    chosen: list[str] = []
    for i in rng.permutation(len(sub.details)):
        d = sub.details[int(i)]
        if len(chosen) < k and compatible_details(sub, chosen + [d]):
            chosen.append(d)
    return ordered_details(sub, chosen)


def _one_detail_edits(sub: Subcategory, details: tuple[str, ...]) -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """All detail sets one edit away, by kind of edit, each with a label of what differs."""
    have = set(details)
    edits: dict[str, list] = {"add": [], "remove": [], "swap": []}
    for d in sub.details:
        if d not in have and len(have) < 4 and compatible_details(sub, have | {d}):
            edits["add"].append((ordered_details(sub, have | {d}), d))
    if len(have) >= 2:
        for d in details:
            edits["remove"].append((ordered_details(sub, have - {d}), d))
    for d in details:
        for e in sub.details:
            if e not in have and compatible_details(sub, (have - {d}) | {e}):
                edits["swap"].append((ordered_details(sub, (have - {d}) | {e}), f"{d} vs {e}"))
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
                first = sample_details(rng, sub)
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


def redrawn_products(products: Sequence[Product], num: int, seed: int, split: str = "train",
                     first_group: int = 1_000_000) -> list[Product]:
    """``num`` new products on the attribute bases of ``split``'s products, each with freshly drawn
    local details: a product of ``split`` picked at random, its details drawn anew.

    Every product of the other splits keeps its signature out (a redrawn product is never one of
    them), and the bases are ``split``'s own, which the catalogue keeps apart from the other
    splits', so nothing of a held-out product is seen. Each product gets its own twin-group
    number from ``first_group`` on, so that its views are jittered apart from every other's.
    Deterministic in ``seed``. Used for the demo ViT's pre-training (``fine_jax.vit_pretrain``):
    the details no longer follow from the base, and the ViT has to see them.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    own = [p for p in products if p.split == split]
    if not own:
        raise ValueError(f"no products in the {split!r} split")
    held_out = {p.signature for p in products if p.split != split}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    out: list[Product] = []
    while len(out) < num:
        base = own[int(rng.integers(len(own)))]
        product = dataclasses.replace(base, details=sample_details(rng, base.spec),
                                      group=first_group + len(out))
        if product.signature not in held_out:
            out.append(product)
    return out

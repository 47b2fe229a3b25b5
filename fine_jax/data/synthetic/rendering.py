"""Drawing the synthetic products: one flat, lit, jittered view of a product as uint8 RGB."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

from fine_jax.data.synthetic.catalogue import COLOURS, SECOND_COLOURS, Product, Subcategory

DEFAULT_VIEWS = 3
DEFAULT_IMAGE_SIZE = 64

_METAL = (206, 170, 62)  # colour of hardware (buckles, zip pullers)

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
    arr = np.asarray(img.reduce(2), dtype=np.float32)
    t = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    light = (np.float32(p["brightness"]) + np.float32(p["gradient"])
             * (np.float32(math.cos(p["gradient_angle"])) * t[None, :]
                + np.float32(math.sin(p["gradient_angle"])) * t[:, None]))
    return np.clip(np.rint(arr * light[:, :, None]), 0, 255).astype(np.uint8)

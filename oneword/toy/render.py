"""Procedural renderer of the toy world: one object per image, defined by discrete attributes.

An object (a :class:`Concept`) is a shape with a fill colour, a pattern drawn inside it in a darker
(or, for dark fills, lighter) shade of the fill, and an outline colour. It is drawn on a background
colour with a random :class:`Pose` (position, size, rotation). The background is not part of the
concept: a concept's reference images vary it, as photographs of one object vary their setting.

The colour vocabularies of fills, backgrounds and outlines are disjoint (no word names two of
them), and chosen so that the object always stands out from every background and its outline from
its fill. Every vocabulary word is a single token of the CLIP tokenizer.

Images are drawn at 4x with :mod:`PIL.ImageDraw` and downsampled with LANCZOS, so edges are smooth;
rendering is deterministic (the same arguments give the same pixels).

A ``tone`` above 0 draws a concept in shades no caption word names: its fill and outline colours
are blended that far toward a neighbouring colour of their vocabulary (:func:`toned_rgb`), as a
real object's colour is rarely exactly the one its name stands for. The toy model was trained at
tone 0 only. A toned concept's references keep to the backgrounds its toned colours stand out
from (:func:`backgrounds_for`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

from oneword.imagegrid import image_grid as contact_sheet  # noqa: F401  (re-exported)

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "moon",
)
FILLS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks")
OUTLINES: tuple[str, ...] = ("black", "gold", "silver", "turquoise")
BACKGROUNDS: tuple[str, ...] = ("gray", "brown", "teal", "navy", "olive", "maroon")

#: The attributes of an image; the first four define a :class:`Concept`.
ATTRIBUTES: tuple[str, ...] = ("shape", "fill", "pattern", "outline", "background")
CONCEPT_ATTRIBUTES: tuple[str, ...] = ATTRIBUTES[:4]

#: The allowed values of each attribute.
VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "fill": FILLS,
    "pattern": PATTERNS,
    "outline": OUTLINES,
    "background": BACKGROUNDS,
}

FILL_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (250, 125, 15),
    "yellow": (255, 225, 40),
    "green": (40, 170, 60),
    "blue": (35, 90, 235),
    "purple": (150, 50, 180),
    "pink": (255, 140, 200),
    "white": (250, 250, 250),
}
OUTLINE_RGB: dict[str, tuple[int, int, int]] = {
    "black": (5, 5, 5),
    "gold": (185, 140, 10),
    "silver": (150, 155, 165),
    "turquoise": (50, 220, 210),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (80, 80, 85),
    "brown": (105, 65, 30),
    "teal": (10, 105, 110),
    "navy": (20, 30, 90),
    "olive": (90, 95, 20),
    "maroon": (105, 15, 40),
}

SUPERSAMPLE = 4
#: Pose ranges: the object's diameter as a fraction of the image side, rotation in degrees.
SCALE_RANGE = (0.5, 0.8)
ROTATION_RANGE = (-30.0, 30.0)
_EXTENT = 1.12  # the farthest any shape (outline included) reaches, in units of its radius


# --------------------------------------------------------------------------------------------------
# Concepts and poses


@dataclass(frozen=True)
class Concept:
    """One toy object: the discrete attributes that stay fixed across its reference images."""

    shape: str
    fill: str
    pattern: str
    outline: str

    def __post_init__(self) -> None:
        for name in CONCEPT_ATTRIBUTES:
            value = getattr(self, name)
            if value not in VOCAB[name]:
                raise ValueError(f"unknown {name} {value!r}; expected one of {VOCAB[name]}")

    def attributes(self) -> dict[str, str]:
        """``{"shape": ..., "fill": ..., "pattern": ..., "outline": ...}``."""
        return {name: getattr(self, name) for name in CONCEPT_ATTRIBUTES}

    @property
    def slug(self) -> str:
        """A file-name-safe identifier, e.g. ``red-star-stripes-gold``."""
        return f"{self.fill}-{self.shape}-{self.pattern}-{self.outline}"

    @classmethod
    def from_slug(cls, slug: str) -> Concept:
        """Inverse of :attr:`slug`."""
        parts = slug.split("-")
        if len(parts) != 4:
            raise ValueError(f"not a concept slug: {slug!r} (expected fill-shape-pattern-outline)")
        fill, shape, pattern, outline = parts
        return cls(shape=shape, fill=fill, pattern=pattern, outline=outline)


@dataclass(frozen=True)
class Pose:
    """Placement of the object: centre ``(x, y)`` as fractions of the image side (y downward),
    ``scale`` the object's diameter as a fraction of the side, ``rotation`` in degrees
    (counter-clockwise)."""

    x: float
    y: float
    scale: float
    rotation: float


def sample_pose(rng: random.Random | np.random.Generator) -> Pose:
    """A random pose that keeps the whole object inside the image.

    ``rng`` is a :class:`random.Random` or a :class:`numpy.random.Generator` (both have
    ``uniform``); no global random state is used.
    """
    scale = float(rng.uniform(*SCALE_RANGE))
    reach = 0.5 * scale * _EXTENT + 0.02
    x = float(rng.uniform(reach, 1.0 - reach))
    y = float(rng.uniform(reach, 1.0 - reach))
    rotation = float(rng.uniform(*ROTATION_RANGE))
    return Pose(x=x, y=y, scale=scale, rotation=rotation)


CENTERED = Pose(x=0.5, y=0.5, scale=0.6, rotation=0.0)


# --------------------------------------------------------------------------------------------------
# Geometry, in unit coordinates: y up, the shape fits (about) in the unit circle


def _circle_pts(
    n: int,
    radius: float = 1.0,
    cx: float = 0.0,
    cy: float = 0.0,
    start: float = 0.0,
    stop: float = 2 * math.pi,
) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=False)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _moon() -> np.ndarray:
    # Outer disc (0, 0, r=1) minus a disc (a, 0, r1): a crescent opening to the right.
    a, r1 = 0.55, 0.85
    xi = (1 - r1 * r1 + a * a) / (2 * a)
    yi = math.sqrt(1 - xi * xi)
    th0 = math.atan2(yi, xi)
    ph0 = math.atan2(yi, xi - a)
    outer = np.stack([np.cos(t := np.linspace(th0, 2 * math.pi - th0, 48)), np.sin(t)], axis=1)
    p = np.linspace(2 * math.pi - ph0, ph0, 40)[1:-1]
    inner = np.stack([a + r1 * np.cos(p), r1 * np.sin(p)], axis=1)
    pts = np.concatenate([outer, inner])
    pts[:, 0] -= (pts[:, 0].max() + pts[:, 0].min()) / 2  # centre the bounding box
    return pts * 1.02


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max() * 0.98


def _star(points: int = 5, inner: float = 0.46) -> np.ndarray:
    ang = math.pi / 2 + np.arange(2 * points) * math.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    pts[:, 1] -= (pts[:, 1].max() + pts[:, 1].min()) / 2
    return pts * 1.04


def _cross(arm: float = 0.34) -> np.ndarray:
    s = 0.98
    a = arm
    pts = [
        (a, s),
        (a, a),
        (s, a),
        (s, -a),
        (a, -a),
        (a, -s),
        (-a, -s),
        (-a, -a),
        (-s, -a),
        (-s, a),
        (-a, a),
        (-a, s),
    ]
    return np.array(pts, dtype=float) * 0.94


@cache
def shape_polygon(shape: str) -> np.ndarray:
    """The outline of ``shape`` as polygon vertices in unit coordinates (y up), read-only."""
    if shape == "circle":
        pts = _circle_pts(72, 0.96)
    elif shape == "square":
        pts = np.array([(1, 1), (-1, 1), (-1, -1), (1, -1)], dtype=float) * 0.76
    elif shape == "triangle":
        ang = math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        pts = np.stack([np.cos(ang), np.sin(ang)], axis=1)
        pts[:, 1] += 0.12  # nearer the bounding-box centre than the centroid
    elif shape == "star":
        pts = _star()
    elif shape == "heart":
        pts = _heart()
    elif shape == "cross":
        pts = _cross()
    elif shape == "diamond":
        pts = np.array([(0, 1), (-0.62, 0), (0, -1), (0.62, 0)], dtype=float) * 1.02
    elif shape == "moon":
        pts = _moon()
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    pts = np.ascontiguousarray(pts, dtype=np.float64)
    pts.setflags(write=False)
    return pts


@cache
def _sharp_vertices(shape: str, min_turn_deg: float = 12.0) -> tuple[int, ...]:
    """Indices of the vertices of :func:`shape_polygon` where the edge turns by more than
    ``min_turn_deg`` (they get a round cap in the outline)."""
    pts = shape_polygon(shape)
    d_in = pts - np.roll(pts, 1, axis=0)
    d_out = np.roll(pts, -1, axis=0) - pts
    a_in = np.arctan2(d_in[:, 1], d_in[:, 0])
    a_out = np.arctan2(d_out[:, 1], d_out[:, 0])
    turn = np.abs((a_out - a_in + np.pi) % (2 * np.pi) - np.pi)
    return tuple(int(i) for i in np.nonzero(turn > math.radians(min_turn_deg))[0])


_STRIPE_PERIOD = 0.7
_STRIPE_WIDTH = 0.3  # the shade covers ~43%: the fill stays the main colour
_DOT_PERIOD = 0.68
_DOT_RADIUS = 0.2
_CHECK_CELL = 0.55


@cache
def _pattern_quads(pattern: str) -> np.ndarray:
    """Pattern polygons (quads, ``(n, 4, 2)``) in unit coordinates, covering the unit disc."""
    quads = []
    if pattern == "stripes":
        half = _STRIPE_WIDTH / 2
        for k in range(-4, 5):
            y = k * _STRIPE_PERIOD
            quads.append([(-1.3, y - half), (1.3, y - half), (1.3, y + half), (-1.3, y + half)])
    elif pattern == "checks":
        c = _CHECK_CELL
        for i in range(-4, 4):
            for j in range(-4, 4):
                if (i + j) % 2 == 0:
                    x0, y0 = i * c, j * c
                    quads.append([(x0, y0), (x0 + c, y0), (x0 + c, y0 + c), (x0, y0 + c)])
    return np.asarray(quads, dtype=np.float64).reshape(-1, 4, 2)


@cache
def _dot_centres() -> np.ndarray:
    pts = []
    p = _DOT_PERIOD
    for j in range(-3, 4):
        shift = p / 2 if j % 2 else 0.0
        for i in range(-3, 4):
            x, y = i * p + shift, j * p * 0.9
            if x * x + y * y < 1.25:
                pts.append((x, y))
    return np.asarray(pts, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Colours


#: Fills dark enough that their pattern is drawn lighter, not darker.
_LIGHTER_PATTERN = frozenset({"blue", "purple"})
_DARKEN = 0.35
_LIGHTEN = 0.65


def pattern_rgb(fill: str, tone: float = 0.0) -> tuple[int, int, int]:
    """The shade a pattern is drawn in: the fill (toned by ``tone``, :func:`toned_rgb`) darkened,
    or lightened for dark fills."""
    r, g, b = toned_rgb("fill", fill, tone)
    if fill in _LIGHTER_PATTERN:
        return (
            round(r + (255 - r) * _LIGHTEN),
            round(g + (255 - g) * _LIGHTEN),
            round(b + (255 - b) * _LIGHTEN),
        )
    return (round(r * _DARKEN), round(g * _DARKEN), round(b * _DARKEN))


#: The largest tone: half way, where the colour's own word and its neighbour's are equally near.
MAX_TONE = 0.5
#: The colour a fill's tone moves toward: its neighbour on the hue wheel (white has no hue).
FILL_TONE_TOWARD: dict[str, str] = {
    "red": "orange",
    "orange": "yellow",
    "yellow": "green",
    "green": "blue",
    "blue": "purple",
    "purple": "pink",
    "pink": "red",
    "white": "white",
}
#: The colour an outline's tone moves toward: the next outline colour.
OUTLINE_TONE_TOWARD: dict[str, str] = {
    name: OUTLINES[(i + 1) % len(OUTLINES)] for i, name in enumerate(OUTLINES)
}


def toned_rgb(part: str, name: str, tone: float = 0.0) -> tuple[int, int, int]:
    """The RGB of a concept's ``part`` (``"fill"`` or ``"outline"``) of colour ``name``, blended
    ``tone`` (0 to :data:`MAX_TONE`) of the way toward :data:`FILL_TONE_TOWARD` /
    :data:`OUTLINE_TONE_TOWARD`: at 0.5 a red fill is drawn vermilion and a gold outline khaki.
    Beyond 0.5 the neighbour's word would be the nearer one, so larger tones are refused."""
    tables = {"fill": (FILL_RGB, FILL_TONE_TOWARD), "outline": (OUTLINE_RGB, OUTLINE_TONE_TOWARD)}
    if part not in tables:
        raise ValueError(f"part must be 'fill' or 'outline', got {part!r}")
    if not 0.0 <= tone <= MAX_TONE:
        raise ValueError(f"tone must be in [0, {MAX_TONE}], got {tone}")
    table, toward = tables[part]
    a, b = table[name], table[toward[name]]
    return tuple(round(x + (y - x) * tone) for x, y in zip(a, b))  # type: ignore[return-value]


def color_rgb(name: str) -> tuple[int, int, int]:
    """RGB of any colour word of the toy world (fill, outline or background)."""
    for table in (FILL_RGB, OUTLINE_RGB, BACKGROUND_RGB):
        if name in table:
            return table[name]
    raise ValueError(f"unknown colour {name!r}")


def _srgb_to_lab(rgb: Sequence[int]) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def color_distance(a: str | Sequence[int], b: str | Sequence[int]) -> float:
    """CIE76 colour difference (Delta E in L*a*b*) of two colour words or RGB triples."""
    ra = color_rgb(a) if isinstance(a, str) else a
    rb = color_rgb(b) if isinstance(b, str) else b
    return float(np.linalg.norm(_srgb_to_lab(ra) - _srgb_to_lab(rb)))


#: Backgrounds closer than this (Delta E) to a concept's outline are not used for its references.
MIN_OUTLINE_CONTRAST = 20.0


def backgrounds_for(concept: Concept, tone: float = 0.0) -> tuple[str, ...]:
    """The backgrounds a concept's outline and fill, toned by ``tone`` (:func:`toned_rgb`), both
    stand out from (at tone 0, in practice: all; at 0.5, e.g. not teal for a turquoise outline)."""
    outline, fill = toned_rgb("outline", concept.outline, tone), toned_rgb("fill", concept.fill, tone)
    return (
        tuple(
            bg
            for bg in BACKGROUNDS
            if color_distance(bg, outline) >= MIN_OUTLINE_CONTRAST
            and color_distance(bg, fill) >= MIN_OUTLINE_CONTRAST
        )
        or BACKGROUNDS
    )


# --------------------------------------------------------------------------------------------------
# Rendering


def _transform(pts: np.ndarray, pose: Pose, side: int) -> np.ndarray:
    """Unit coordinates (y up) -> pixel coordinates of a ``side``-pixel canvas (y down)."""
    radius = 0.5 * pose.scale * side
    th = math.radians(pose.rotation)
    c, s = math.cos(th), math.sin(th)
    x = pts[..., 0]
    y = pts[..., 1]
    px = pose.x * side + radius * (c * x - s * y)
    py = pose.y * side - radius * (s * x + c * y)
    return np.stack([px, py], axis=-1)


def _outline_width(pose: Pose, side: int) -> int:
    """Outline thickness on the supersampled canvas: 13% of the radius, at least 1.25 final px."""
    radius = 0.5 * pose.scale * side
    return max(round(1.25 * SUPERSAMPLE), round(0.13 * radius))


def render(
    concept: Concept, background: str, pose: Pose = CENTERED, size: int = 64, tone: float = 0.0
) -> Image.Image:
    """Draw ``concept`` on ``background`` at ``pose`` as a ``size`` x ``size`` RGB image, its fill
    and outline colours toned by ``tone`` (:func:`toned_rgb`; 0: the vocabulary's own)."""
    if background not in BACKGROUND_RGB:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    if not isinstance(concept, Concept):
        raise TypeError(f"expected a Concept, got {type(concept).__name__}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND_RGB[background])
    draw = ImageDraw.Draw(canvas)
    poly = _transform(shape_polygon(concept.shape), pose, side)
    poly_list = [tuple(p) for p in poly.tolist()]
    fill = toned_rgb("fill", concept.fill, tone)

    if concept.pattern == "solid":
        draw.polygon(poly_list, fill=fill)
    else:
        # Pattern layer (fill + pattern in the object's frame), pasted through the shape's mask.
        x0, y0 = np.floor(poly.min(0)).astype(int) - 1
        x1, y1 = np.ceil(poly.max(0)).astype(int) + 2
        x0, y0 = max(int(x0), 0), max(int(y0), 0)
        x1, y1 = min(int(x1), side), min(int(y1), side)
        w, h = x1 - x0, y1 - y0
        layer = Image.new("RGB", (w, h), fill)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in poly_list], fill=255)
        ldraw = ImageDraw.Draw(layer)
        shade = pattern_rgb(concept.fill, tone)
        offset = np.array([x0, y0], dtype=np.float64)
        if concept.pattern == "dots":
            centres = _transform(_dot_centres(), pose, side) - offset
            r = _DOT_RADIUS * 0.5 * pose.scale * side
            for cx, cy in centres.tolist():
                ldraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=shade)
        else:
            quads = _transform(_pattern_quads(concept.pattern), pose, side) - offset
            for q in quads.tolist():
                ldraw.polygon([tuple(p) for p in q], fill=shade)
        canvas.paste(layer, (x0, y0), mask)

    # The outline straddles the shape's edge; round caps only where the edge turns sharply
    # (PIL's joint="curve" at every vertex of the smooth shapes would cost more than the rest).
    width = _outline_width(pose, side)
    ink = toned_rgb("outline", concept.outline, tone)
    draw.line(poly_list + poly_list[:1], fill=ink, width=width)
    r = width / 2
    for i in _sharp_vertices(concept.shape):
        cx, cy = poly_list[i]
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    # LANCZOS from 2x after a 2x box reduction: the same look as LANCZOS from 4x, at half the cost.
    return canvas.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)


def render_concept_images(
    concept: Concept,
    n: int,
    seed: int,
    size: int = 64,
    backgrounds: Sequence[str] | None = None,
    tone: float = 0.0,
) -> list[tuple[Image.Image, str]]:
    """``n`` reference images of ``concept`` with random poses and varied backgrounds (and its
    colours toned by ``tone``: :func:`toned_rgb`).

    Backgrounds cycle through a seeded shuffle of ``backgrounds`` (default: every background the
    concept, toned, stands out from), so ``n`` images use ``min(n, len(backgrounds))`` distinct ones.
    Returns ``(image, background)`` pairs; the same ``seed`` gives the same pixels.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    pool = list(backgrounds_for(concept, tone) if backgrounds is None else backgrounds)
    if not pool:
        raise ValueError("backgrounds must not be empty")
    for bg in pool:
        if bg not in BACKGROUND_RGB:
            raise ValueError(f"unknown background {bg!r}; expected one of {BACKGROUNDS}")
    rng = random.Random(seed)
    out: list[tuple[Image.Image, str]] = []
    order: list[str] = []
    for _ in range(n):
        if not order:
            order = pool[:]
            rng.shuffle(order)
        bg = order.pop()
        out.append((render(concept, bg, sample_pose(rng), size=size, tone=tone), bg))
    return out


# --------------------------------------------------------------------------------------------------
# The concept space


def all_concepts() -> list[Concept]:
    """Every concept (the full product of the attribute vocabularies), in a fixed order."""
    return [
        Concept(shape=s, fill=f, pattern=p, outline=o)
        for s, f, p, o in product(SHAPES, FILLS, PATTERNS, OUTLINES)
    ]


def split_concepts(seed: int = 0, holdout_fraction: float = 0.1) -> tuple[list[Concept], list[Concept]]:
    """A deterministic split of the concepts into ``(train, held_out)``.

    About ``holdout_fraction`` of the attribute combinations are held out; the two lists are
    disjoint, and every single attribute value still appears in at least one training concept
    (held-out concepts are new *combinations* of known values). Both lists keep the order of
    :func:`all_concepts`.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    concepts = all_concepts()
    target = max(1, round(holdout_fraction * len(concepts)))
    order = list(range(len(concepts)))
    random.Random(seed).shuffle(order)
    counts = {(name, value): 0 for name in CONCEPT_ATTRIBUTES for value in VOCAB[name]}
    for c in concepts:
        for name, value in c.attributes().items():
            counts[(name, value)] += 1
    held: set[int] = set()
    for i in order:
        if len(held) >= target:
            break
        keys = list(concepts[i].attributes().items())
        if all(counts[k] > 1 for k in keys):  # keep every value in training at least once
            for k in keys:
                counts[k] -= 1
            held.add(i)
    train = [c for i, c in enumerate(concepts) if i not in held]
    held_out = [c for i, c in enumerate(concepts) if i in held]
    return train, held_out


# --------------------------------------------------------------------------------------------------
# Contact sheets

"""Planning the synthetic catalog: which items exist, what each looks like, which images of them.

Items come in groups. All items of a group share the global look (silhouette, base colour,
texture) and differ only in small local details (collar, chest logo, buttons, cuff stripes,
pocket); every two items of a group differ in at least two details. A global-only embedding
therefore confuses the items of a group, and fine-grained tokens can tell them apart.

Randomness comes from `np.random.default_rng([seed, purpose, a, b, c])` (`keyed_rng`).
Every key has the same length on purpose: numpy's SeedSequence gives the same stream for
keys that differ only by trailing zeros.

Splits follow In-Shop: whole groups go to train or to test, so train items are disjoint
from query/gallery items. Train items get shop and consumer views (`split="train"`); test
items get shop views in the gallery and `query_domain` views as queries.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mga.errors import InputError


RGB = tuple[int, int, int]
Point = tuple[float, float]

DOMAIN_CODES = {"shop": 0, "consumer": 1}
QUERY_DOMAINS = tuple(DOMAIN_CODES)
# Greedy sampling of detail combinations at Hamming distance >= 2 succeeds easily well
# past this (the option space has 2520 combinations); the cap keeps that a guarantee.
MAX_ITEMS_PER_GROUP = 64

# RNG purposes, the word after the seed in every key.
RNG_LOOK_ORDER, RNG_LOOK, RNG_SPLIT, RNG_DETAILS, RNG_VIEW = range(5)

_ACCENT_COLOURS = 3  # logo colours per group; buttons use the first two
DETAIL_OPTIONS: dict[str, tuple[str, ...]] = {
    "collar": ("crew", "vneck", "polo", "mock"),
    # Shape and colour are one option so that "none" is a single value: two items that
    # differ in an option always render differently.
    "logo": ("none", *(f"{shape}-{c}" for shape in ("circle", "triangle", "square") for c in range(3))),
    "buttons": ("none", *(f"{count}-{c}" for count in (2, 3, 4) for c in range(2))),
    "cuffs": ("0", "1", "2"),
    "pocket": ("none", "chest", "hip"),
}
MIN_DETAIL_DIFFERENCES = 2


@dataclass(frozen=True)
class SynthSpec:
    """What to generate; the same spec always yields the same catalog, byte for byte."""

    seed: int = 0
    groups: int = 24
    items_per_group: int = 4
    test_fraction: float = 0.5  # fraction of GROUPS held out for query/gallery
    train_views: int = 6  # per train item: ceil(n/2) shop, floor(n/2) consumer
    gallery_views: int = 2  # shop views per test item
    query_views: int = 2  # per test item, in query_domain
    query_domain: str = "consumer"  # "consumer" (Consumer-to-Shop-like) | "shop" (In-Shop-like)
    image_size: int = 128  # square output, pixels
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise InputError(f"SynthSpec.seed must be >= 0, got {self.seed}")
        for name in ("groups", "items_per_group", "train_views", "gallery_views", "query_views"):
            value = getattr(self, name)
            if value < 1:
                raise InputError(f"SynthSpec.{name} must be positive, got {value}")
        if self.items_per_group > MAX_ITEMS_PER_GROUP:
            raise InputError(
                f"SynthSpec.items_per_group must be <= {MAX_ITEMS_PER_GROUP}, got {self.items_per_group}"
            )
        # Range first: round() of NaN would raise an error that names nothing.
        if not 0 < self.test_fraction < 1 or not 1 <= self.test_group_count <= self.groups - 1:
            raise InputError(
                f"SynthSpec.test_fraction must be in (0, 1) and leave at least one of the "
                f"{self.groups} groups on each side, got {self.test_fraction}"
            )
        if self.query_domain not in QUERY_DOMAINS:
            raise InputError(f"SynthSpec.query_domain must be one of {QUERY_DOMAINS}, got {self.query_domain!r}")
        if self.image_size < 32:
            raise InputError(f"SynthSpec.image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"SynthSpec.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    @property
    def test_group_count(self) -> int:
        """Groups held out for query/gallery (round half to even)."""
        return round(self.groups * self.test_fraction)


@dataclass(frozen=True)
class PlannedImage:
    """One image of the catalog, before rendering."""

    image_id: str
    item_id: str
    group_id: str
    split: str  # train | query | gallery
    domain: str  # shop | consumer
    category: str  # the silhouette family
    item_index: int  # global: group * items_per_group + member
    view_index: int  # per (item, domain)


@dataclass(frozen=True)
class Silhouette:
    """A garment shape family, symmetric about x = 0.5, with where its details sit."""

    name: str
    # From the left neck edge round the left side to the left hem corner; the right
    # side is the mirror image. The first point fixes the neckline (its y, its width).
    left_half: tuple[Point, ...]
    cuffs: tuple[tuple[Point, Point], ...]  # left-side edges that cuff stripes follow
    logo: Point  # left chest; the chest pocket sits on the mirror side
    buttons_end: float  # the button line runs at x = 0.5 from below the collar to here
    hip_y: float
    front_opening: bool = False

    @property
    def neck(self) -> tuple[float, float]:
        """(y of the neckline, its half width)."""
        x, y = self.left_half[0]
        return y, 0.5 - x

    @property
    def outline(self) -> list[Point]:
        return list(self.left_half) + [(1 - x, y) for x, y in reversed(self.left_half)]

    @property
    def hem_y(self) -> float:
        return max(y for _, y in self.left_half)


SILHOUETTES = (
    Silhouette(
        "tshirt",
        ((0.40, 0.12), (0.29, 0.15), (0.11, 0.33), (0.21, 0.43), (0.30, 0.33), (0.31, 0.88)),
        cuffs=(((0.11, 0.33), (0.21, 0.43)),),
        logo=(0.40, 0.28),
        buttons_end=0.48,
        hip_y=0.74,
    ),
    Silhouette(
        "longsleeve",
        ((0.40, 0.12), (0.29, 0.15), (0.20, 0.30), (0.10, 0.78), (0.19, 0.80), (0.27, 0.42), (0.30, 0.86)),
        cuffs=(((0.10, 0.78), (0.19, 0.80)),),
        logo=(0.40, 0.28),
        buttons_end=0.48,
        hip_y=0.72,
    ),
    Silhouette(
        "jacket",
        ((0.40, 0.10), (0.26, 0.13), (0.16, 0.30), (0.06, 0.82), (0.17, 0.84), (0.25, 0.42), (0.26, 0.91)),
        cuffs=(((0.06, 0.82), (0.17, 0.84)),),
        logo=(0.38, 0.27),
        buttons_end=0.62,
        hip_y=0.76,
        front_opening=True,
    ),
    Silhouette(
        "dress",
        ((0.41, 0.11), (0.34, 0.11), (0.32, 0.30), (0.36, 0.46), (0.19, 0.92)),
        cuffs=(((0.19, 0.92), (0.50, 0.92)),),
        logo=(0.41, 0.27),
        buttons_end=0.44,
        hip_y=0.64,
    ),
    Silhouette(
        "tanktop",
        ((0.42, 0.10), (0.36, 0.10), (0.33, 0.25), (0.28, 0.33), (0.29, 0.86)),
        cuffs=(((0.29, 0.86), (0.50, 0.86)),),
        logo=(0.40, 0.30),
        buttons_end=0.50,
        hip_y=0.72,
    ),
)

BASE_COLOURS: tuple[RGB, ...] = (
    (32, 45, 92),  # navy
    (178, 34, 42),  # crimson
    (36, 102, 60),  # forest
    (212, 168, 48),  # mustard
    (128, 128, 132),  # grey
    (42, 40, 44),  # black
    (226, 140, 170),  # pink
    (30, 140, 150),  # teal
    (120, 78, 48),  # brown
    (120, 170, 222),  # sky
    (110, 112, 40),  # olive
    (112, 60, 142),  # purple
)
TEXTURES = ("solid", "hstripes", "vstripes", "checks", "dots")
# Logo and button colours: each group takes the ones farthest from its base colour.
ACCENT_CANDIDATES: tuple[RGB, ...] = (
    (246, 246, 246),
    (18, 18, 18),
    (224, 30, 30),
    (250, 212, 30),
    (30, 80, 224),
    (30, 172, 64),
    (246, 130, 20),
)
# Every (silhouette, colour, texture) once before any repeats.
_LOOK_TABLE = tuple(itertools.product(range(len(SILHOUETTES)), range(len(BASE_COLOURS)), range(len(TEXTURES))))


@dataclass(frozen=True)
class GroupLook:
    """What all items of a group share."""

    silhouette: Silhouette
    base: RGB
    texture: str
    secondary: RGB  # the texture's second colour
    period: float  # texture period, fraction of the canvas
    trim: RGB  # collar, cuff stripes, pocket seams: contrasts with the base
    shade: RGB  # garment inside (neck hole) and outlines
    accents: tuple[RGB, ...]


def keyed_rng(seed: int, purpose: int, a: int = 0, b: int = 0, c: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, a, b, c])


def mix_colour(colour: RGB, towards: RGB, amount: float) -> RGB:
    return tuple(int(round(c + (t - c) * amount)) for c, t in zip(colour, towards))  # type: ignore[return-value]


def _luminance(colour: RGB) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


@lru_cache(maxsize=16)
def _look_order(seed: int) -> np.ndarray:
    return keyed_rng(seed, RNG_LOOK_ORDER).permutation(len(_LOOK_TABLE))


@lru_cache(maxsize=4096)
def group_look(spec: SynthSpec, group: int) -> GroupLook:
    """The global look of `group`: distinct for the first len(_LOOK_TABLE) groups."""
    silhouette_index, colour_index, texture_index = _LOOK_TABLE[_look_order(spec.seed)[group % len(_LOOK_TABLE)]]
    rng = keyed_rng(spec.seed, RNG_LOOK, group)
    jittered = np.clip(np.array(BASE_COLOURS[colour_index]) + rng.integers(-12, 13, 3), 0, 255)
    base: RGB = tuple(int(v) for v in jittered)  # type: ignore[assignment]
    dark = _luminance(base) < 120
    white, black = (255, 255, 255), (0, 0, 0)
    accents = sorted(ACCENT_CANDIDATES, key=lambda c: -sum((x - y) ** 2 for x, y in zip(c, base)))
    return GroupLook(
        silhouette=SILHOUETTES[silhouette_index],
        base=base,
        texture=TEXTURES[texture_index],
        secondary=mix_colour(base, white if dark else black, 0.45),
        period=float(rng.uniform(0.055, 0.085)),
        trim=mix_colour(base, white if dark else black, 0.65),
        shade=mix_colour(base, black, 0.6),
        # Muted towards the base: look-alike garments differ in details that do not shout.
        accents=tuple(mix_colour(accent, base, 0.4) for accent in accents[:_ACCENT_COLOURS]),
    )


@lru_cache(maxsize=4096)
def _group_details(spec: SynthSpec, group: int) -> tuple[tuple[int, ...], ...]:
    """Option indices per item, pairwise differing in >= MIN_DETAIL_DIFFERENCES slots."""
    rng = keyed_rng(spec.seed, RNG_DETAILS, group)
    sizes = [len(options) for options in DETAIL_OPTIONS.values()]
    chosen: list[tuple[int, ...]] = []
    for _ in range(100_000):
        candidate = tuple(int(rng.integers(size)) for size in sizes)
        if all(sum(a != b for a, b in zip(candidate, other)) >= MIN_DETAIL_DIFFERENCES for other in chosen):
            chosen.append(candidate)
            if len(chosen) == spec.items_per_group:
                return tuple(chosen)
    raise RuntimeError(f"could not draw {spec.items_per_group} distinct detail sets for group {group}")


def item_details(spec: SynthSpec, item_index: int) -> dict[str, str]:
    """The local details of an item, one option per slot of DETAIL_OPTIONS."""
    if not 0 <= item_index < spec.groups * spec.items_per_group:
        raise ValueError(f"item_index out of range: {item_index}")
    group, member = divmod(item_index, spec.items_per_group)
    choice = _group_details(spec, group)[member]
    return {slot: options[i] for (slot, options), i in zip(DETAIL_OPTIONS.items(), choice)}


@lru_cache(maxsize=16)
def _test_groups(spec: SynthSpec) -> frozenset[int]:
    return frozenset(int(g) for g in keyed_rng(spec.seed, RNG_SPLIT).permutation(spec.groups)[: spec.test_group_count])


def plan_catalog(spec: SynthSpec) -> list[PlannedImage]:
    """Every image of the catalog, in item order, without rendering anything."""
    test_groups = _test_groups(spec)
    train_shop = (spec.train_views + 1) // 2
    if spec.query_domain == "shop":  # extra shop views, never the gallery's view indices
        query_views = [("query", "shop", spec.gallery_views + v) for v in range(spec.query_views)]
    else:
        query_views = [("query", "consumer", v) for v in range(spec.query_views)]
    test_views = [("gallery", "shop", v) for v in range(spec.gallery_views)] + query_views
    train_views = [("train", "shop", v) for v in range(train_shop)] + [
        ("train", "consumer", v) for v in range(spec.train_views - train_shop)
    ]
    planned = []
    for group in range(spec.groups):
        group_id = f"g{group:03d}"
        category = group_look(spec, group).silhouette.name
        for member in range(spec.items_per_group):
            item_id = f"{group_id}-i{member:02d}"
            for split, domain, view in test_views if group in test_groups else train_views:
                planned.append(
                    PlannedImage(
                        image_id=f"synth-{item_id}-{domain}-{view:02d}",
                        item_id=item_id,
                        group_id=group_id,
                        split=split,
                        domain=domain,
                        category=category,
                        item_index=group * spec.items_per_group + member,
                        view_index=view,
                    )
                )
    return planned

"""Drawing the synthetic catalog: one JPEG per planned image, a pure function of (spec, planned image).

`render_image` needs no other image, so a pipeline can render in parallel and still get
byte-identical JPEGs; a view's randomness is keyed by `(item_index, view_index,
domain_code)`. Shop views stand on plain backgrounds, consumer views on cluttered ones with
occlusion.

Drawing happens in unit coordinates (x right, y down, the garment roughly in [0.07, 0.93]),
on a canvas twice the output size that is box-downsampled at the end for anti-aliasing.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from pipelines.synthetic.planning import (
    DOMAIN_CODES,
    RGB,
    RNG_VIEW,
    GroupLook,
    PlannedImage,
    Point,
    SynthSpec,
    group_look,
    item_details,
    keyed_rng,
    mix_colour,
)

SUPERSAMPLE = 2


# ---------------------------------------------------------------------------- garment


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return xs, ys


def _texture(look: GroupLook, size: int, offset: tuple[float, float]) -> np.ndarray:
    """The garment cloth over the whole canvas (the silhouette mask cuts it out later).

    `offset` shifts the print by a fraction of its period: the same garment, folded or
    hung differently, shows its stripes or dots elsewhere from one photo to the next.
    """
    xs, ys = _grid(size)
    phase_x, phase_y = (xs / look.period + offset[0]) % 1.0, (ys / look.period + offset[1]) % 1.0
    if look.texture == "hstripes":
        weight = (phase_y < 0.5).astype(np.float32)
    elif look.texture == "vstripes":
        weight = (phase_x < 0.5).astype(np.float32)
    elif look.texture == "checks":  # gingham: three tones where bands cross
        weight = 0.5 * ((phase_x < 0.5).astype(np.float32) + (phase_y < 0.5))
    elif look.texture == "dots":
        weight = (((phase_x - 0.5) ** 2 + (phase_y - 0.5) ** 2) < 0.22**2).astype(np.float32)
    else:
        weight = np.zeros_like(xs)
    base, secondary = np.array(look.base, np.float32), np.array(look.secondary, np.float32)
    cloth = base + weight[..., None] * (secondary - base)
    # Darker towards the sides reads as a rounded body rather than a flat sticker.
    cloth *= (1.0 - 0.2 * ((xs - 0.5) * 2) ** 2)[..., None]
    return np.clip(cloth, 0, 255).astype(np.uint8)


def _points(points: list[Point], size: int) -> list[Point]:
    """Unit coordinates to canvas pixels."""
    return [(x * size, y * size) for x, y in points]


def _box(cx: float, cy: float, rx: float, ry: float, size: int) -> tuple[float, float, float, float]:
    """The canvas box of half-extents (rx, ry) around the unit point (cx, cy)."""
    return ((cx - rx) * size, (cy - ry) * size, (cx + rx) * size, (cy + ry) * size)


def _draw_collar(draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, look: GroupLook, kind: str, size: int) -> None:
    """The neckline; parts that rise above the shoulders go into the mask too."""
    y, half = look.silhouette.neck
    rib = max(1, round(0.022 * size))
    if kind == "crew":
        neck = _box(0.5, y, half, 0.06, size)
        draw.pieslice(neck, 0, 180, fill=look.shade)
        draw.arc(neck, 0, 180, fill=look.trim, width=rib)
    elif kind == "vneck":
        v = _points([(0.5 - half, y), (0.5, y + 0.14), (0.5 + half, y)], size)
        draw.polygon(v, fill=look.shade)
        draw.line(v, fill=look.trim, width=rib, joint="curve")
    elif kind == "polo":
        draw.pieslice(_box(0.5, y, 0.7 * half, 0.035, size), 0, 180, fill=look.shade)
        corners = ((half + 0.015, -0.005), (0.0, 0.03), (0.025, 0.11), (half + 0.035, 0.075))
        for sign in (-1, 1):
            flap = _points([(0.5 + sign * dx, y + dy) for dx, dy in corners], size)
            draw.polygon(flap, fill=look.trim, outline=look.shade, width=max(1, size // 128))
            mask.polygon(flap, fill=255)
    elif kind == "mock":
        band = _box(0.5, y - 0.0125, half - 0.01, 0.0425, size)
        draw.rectangle(band, fill=look.trim)
        mask.rectangle(band, fill=255)
        draw.ellipse(_box(0.5, y - 0.055, half - 0.025, 0.015, size), fill=look.shade)
    else:
        raise ValueError(f"unknown collar {kind!r}")


def _draw_logo(draw: ImageDraw.ImageDraw, look: GroupLook, option: str, size: int) -> None:
    if option == "none":
        return
    shape, colour = option.split("-")
    (cx, cy), r = look.silhouette.logo, 0.05
    style = dict(fill=look.accents[int(colour)], outline=look.shade, width=max(1, size // 128))
    if shape == "circle":
        draw.ellipse(_box(cx, cy, r, r, size), **style)
    elif shape == "triangle":
        draw.polygon(_points([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], size), **style)
    else:
        draw.rectangle(_box(cx, cy, 0.85 * r, 0.85 * r, size), **style)


def _draw_buttons(draw: ImageDraw.ImageDraw, look: GroupLook, option: str, size: int) -> None:
    if option == "none":
        return
    count, colour = (int(v) for v in option.split("-"))
    neck_y, _ = look.silhouette.neck
    style = dict(fill=look.accents[colour], outline=look.shade, width=max(1, size // 128))
    # Start below the deepest neckline (the V) so no collar hides a button.
    for y in np.linspace(neck_y + 0.17, look.silhouette.buttons_end, count):
        draw.ellipse(_box(0.5, float(y), 0.021, 0.021, size), **style)


def _draw_cuffs(draw: ImageDraw.ImageDraw, look: GroupLook, count: int, size: int) -> None:
    """Stripes parallel to each sleeve end (or hem), stepping inwards; the mask clips overhang."""
    body_centre = np.array([0.5, 0.4])
    for a, b in look.silhouette.cuffs:
        for p, q in ((np.array(a), np.array(b)), (np.array([1 - a[0], a[1]]), np.array([1 - b[0], b[1]]))):
            along = (q - p) / np.linalg.norm(q - p)
            normal = np.array([-along[1], along[0]])
            if normal @ (body_centre - (p + q) / 2) < 0:
                normal = -normal
            for i in range(count):
                offset = normal * (0.035 + 0.05 * i)
                stripe = [tuple(p + offset - 0.03 * along), tuple(q + offset + 0.03 * along)]
                draw.line(_points(stripe, size), fill=look.trim, width=max(1, round(0.028 * size)))


def _draw_pocket(draw: ImageDraw.ImageDraw, look: GroupLook, option: str, size: int) -> None:
    sil = look.silhouette
    if option == "chest":
        centres = [(1 - sil.logo[0], sil.logo[1] + 0.02)]
    elif option == "hip":
        centres = [(0.5 - 0.12, sil.hip_y), (0.5 + 0.12, sil.hip_y)]
    else:
        return
    seam = max(1, round(0.014 * size))
    for cx, cy in centres:
        draw.rectangle(_box(cx, cy, 0.05, 0.05, size), outline=look.trim, width=seam)
        draw.line(_points([(cx - 0.05, cy - 0.02), (cx + 0.05, cy - 0.02)], size), fill=look.trim, width=seam)


@lru_cache(maxsize=32)
def _garment(spec: SynthSpec, item_index: int, view: "_ViewParams") -> Image.Image:
    """The item in its canonical pose on a transparent canvas, with the view's print offset and light."""
    size = spec.image_size * SUPERSAMPLE
    look = group_look(spec, item_index // spec.items_per_group)
    details = item_details(spec, item_index)
    cloth = Image.fromarray(_texture(look, size, view.print_offset))
    mask = Image.new("L", (size, size), 0)
    draw, mask_draw = ImageDraw.Draw(cloth), ImageDraw.Draw(mask)
    outline = _points(look.silhouette.outline, size)
    mask_draw.polygon(outline, fill=255)
    # Half of this edge falls outside the mask: a thin dark rim that separates the
    # garment from a background of similar colour.
    draw.line(outline + outline[:1], fill=look.shade, width=max(2, size // 64))
    if look.silhouette.front_opening:
        neck_y, _ = look.silhouette.neck
        opening = _points([(0.5, neck_y), (0.5, look.silhouette.hem_y)], size)
        draw.line(opening, fill=look.shade, width=max(1, size // 96))
    _draw_cuffs(draw, look, int(details["cuffs"]), size)
    _draw_pocket(draw, look, details["pocket"], size)
    _draw_collar(draw, mask_draw, look, details["collar"], size)
    _draw_logo(draw, look, details["logo"], size)
    _draw_buttons(draw, look, details["buttons"], size)
    cloth = Image.fromarray(_light(np.asarray(cloth), view.light_angle, view.light_strength))
    cloth.putalpha(mask)
    return cloth


def _light(pixels: np.ndarray, angle: float, strength: float) -> np.ndarray:
    """A soft light falling from `angle` across the garment, details included (photo lighting)."""
    xs, ys = _grid(pixels.shape[0])
    ramp = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)  # in about [-0.7, 0.7]
    return np.clip(pixels * (1.0 + strength * ramp)[..., None], 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ views


@dataclass(frozen=True)
class _ViewParams:
    scale: float
    turn: float  # width factor of a body turned away from the camera (1 = facing it)
    angle_deg: float
    shift: tuple[float, float]  # fraction of the image
    flip: bool
    brightness: float
    contrast: float
    gains: tuple[float, float, float]  # colour cast
    noise: float  # pixel sigma
    print_offset: tuple[float, float]  # texture shift, fraction of its period
    light_angle: float  # radians: where the light falls from
    light_strength: float  # brightness swing across the garment


def _view_params(rng: np.random.Generator, domain: str) -> _ViewParams:
    # Every photo of an item, shop ones too, hangs the cloth and lights it anew, so two
    # photos of one item differ globally about as much as two look-alike items do.
    print_offset = (float(rng.uniform(0, 1)), float(rng.uniform(0, 1)))
    light_angle = float(rng.uniform(0, 2 * math.pi))
    if domain == "shop":  # product photo: centred, nearly upright, studio light
        return _ViewParams(
            scale=float(rng.uniform(0.82, 0.98)),
            turn=float(rng.uniform(0.8, 1.0)),
            angle_deg=float(rng.uniform(-6, 6)),
            shift=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.04, 0.04))),
            flip=False,
            brightness=float(rng.uniform(0.9, 1.1)),
            contrast=float(rng.uniform(0.9, 1.1)),
            gains=tuple(float(g) for g in rng.uniform(0.96, 1.04, 3)),  # type: ignore[arg-type]
            noise=float(rng.uniform(0, 3)),
            print_offset=print_offset,
            light_angle=light_angle,
            light_strength=float(rng.uniform(0.1, 0.4)),
        )
    # Upward shifts are small so the collar stays in frame: it is never occluded either,
    # which keeps at least one detail visible in every consumer view.
    return _ViewParams(
        scale=float(rng.uniform(0.62, 1.0)),
        turn=float(rng.uniform(0.75, 1.0)),
        angle_deg=float(rng.uniform(-10, 10)),
        shift=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.04, 0.12))),
        flip=bool(rng.random() < 0.5),
        brightness=float(rng.uniform(0.7, 1.2)),
        contrast=float(rng.uniform(0.75, 1.2)),
        gains=tuple(float(g) for g in rng.uniform(0.92, 1.08, 3)),  # type: ignore[arg-type]
        noise=float(rng.uniform(2, 7)),
        print_offset=print_offset,
        light_angle=light_angle,
        light_strength=float(rng.uniform(0.2, 0.6)),
    )


def _shop_background(rng: np.random.Generator, size: int) -> Image.Image:
    tint = np.array([238, 238, 238]) + rng.integers(-6, 12, 3)
    _, ys = _grid(size)
    # A faint studio falloff towards the floor.
    pixels = tint[None, None, :] * (1.0 - 0.05 * ys[..., None])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGBA")


def _random_colour(rng: np.random.Generator) -> RGB:
    return tuple(int(v) for v in rng.integers(20, 236, 3))  # type: ignore[return-value]


def _consumer_background(rng: np.random.Generator, size: int) -> Image.Image:
    xs, ys = _grid(size)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.clip(0.5 + (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle), 0, 1)[..., None]
    start, end = np.array(_random_colour(rng), np.float32), np.array(_random_colour(rng), np.float32)
    image = Image.fromarray((start + ramp * (end - start)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.08, 0.5, 2) * size
        colour, kind = _random_colour(rng), int(rng.integers(3))
        if kind == 0:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(2, max(3, size // 24))))
    return image.convert("RGBA")


def _place(garment: Image.Image, view: _ViewParams, size: int) -> Image.Image:
    """Scale, rotate, flip and shift the canonical garment about the canvas centre."""
    theta = math.radians(view.angle_deg)
    rotation_inverse = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    flip = np.diag([-1.0 if view.flip else 1.0, 1.0])
    output_to_input = np.diag([1.0 / view.turn, 1.0]) @ flip @ rotation_inverse / view.scale
    centre = np.array([size / 2, size / 2])
    origin = centre - output_to_input @ (centre + np.array(view.shift) * size)
    (a, b), (d, e) = output_to_input
    affine = (a, b, origin[0], d, e, origin[1])
    return garment.transform((size, size), Image.Transform.AFFINE, affine, resample=Image.Resampling.BILINEAR)


def _occlude(image: Image.Image, rng: np.random.Generator, box: tuple[int, int, int, int]) -> None:
    """One object over the left, right or bottom part of the garment, never its collar or centre line."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    ow, oh = rng.uniform(0.25, 0.4) * w, rng.uniform(0.25, 0.45) * h
    side = int(rng.integers(3))
    if side == 0:
        cx, cy = x1 + rng.uniform(0, 0.15) * w, y1 + rng.uniform(0.45, 0.9) * h
    elif side == 1:
        cx, cy = x2 - rng.uniform(0, 0.15) * w, y1 + rng.uniform(0.45, 0.9) * h
    else:
        cx, cy = x1 + rng.uniform(0.25, 0.75) * w, y2 - rng.uniform(0, 0.12) * h
    shape = (cx - ow / 2, cy - oh / 2, cx + ow / 2, cy + oh / 2)
    draw = ImageDraw.Draw(image)
    colour = _random_colour(rng)
    outline = dict(fill=colour, outline=mix_colour(colour, (0, 0, 0), 0.5), width=2)
    if rng.random() < 0.5:
        draw.ellipse(shape, **outline)
    else:
        draw.rounded_rectangle(shape, radius=min(ow, oh) / 4, **outline)


def _bbox(alpha: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero((alpha > 127).any(axis=1)), np.flatnonzero((alpha > 127).any(axis=0))
    if rows.size == 0:
        raise RuntimeError("garment left the frame")  # view ranges keep its centre in view
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def render_image(spec: SynthSpec, planned: PlannedImage) -> tuple[bytes, tuple[int, int, int, int]]:
    """The JPEG of one planned image and the garment's (x1, y1, x2, y2) in it.

    The bbox follows PIL's crop convention (x2, y2 exclusive), lies within
    [0, image_size], and covers the garment including any occluded part.
    """
    if planned.domain not in DOMAIN_CODES:
        raise ValueError(f"unknown domain {planned.domain!r}")
    rng = keyed_rng(spec.seed, RNG_VIEW, planned.item_index, planned.view_index, DOMAIN_CODES[planned.domain])
    size = spec.image_size * SUPERSAMPLE
    view = _view_params(rng, planned.domain)
    background = _shop_background(rng, size) if planned.domain == "shop" else _consumer_background(rng, size)
    garment = _place(_garment(spec, planned.item_index, view), view, size)
    box = _bbox(np.asarray(garment.getchannel("A")))
    image = Image.alpha_composite(background, garment).convert("RGB")
    if planned.domain == "consumer":
        _occlude(image, rng, box)
    pixels = np.asarray(image.reduce(SUPERSAMPLE), np.float32)
    pixels = ((pixels - 128.0) * view.contrast + 128.0) * view.brightness * np.array(view.gains, np.float32)
    if view.noise:
        pixels += rng.normal(0.0, view.noise, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=spec.jpeg_quality)
    x1, y1, x2, y2 = box
    # Floor the start and ceil the end so the downsampled box still covers every garment pixel.
    bbox = (x1 // SUPERSAMPLE, y1 // SUPERSAMPLE, -(-x2 // SUPERSAMPLE), -(-y2 // SUPERSAMPLE))
    return buffer.getvalue(), bbox

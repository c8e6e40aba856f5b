"""A seeded generator of thin-structure segmentation samples (wires, rings, meshes, branches).

Each sample is one object on a textured background, like an HQSeg-44K image/mask pair. The object
is a set of round-capped strokes (line segments with a width, in pixel units); its mask is the
exact rasterisation of those strokes at full resolution (a pixel is foreground when its centre lies
within half a stroke width of a segment), and the image is drawn anti-aliased: the stroke coverage
is rasterised at 4x4 samples per pixel and averaged, and the object's colour is blended over the
background by that coverage (the same as drawing at 4x and box-downsampling).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

THIN_KINDS = ("lines", "rings", "meshes", "branches")
SUPERSAMPLING = 4
_PIECE = 8.0  # long segments are rasterised in pieces of at most this many pixels


def generate_thin_structures(
    count: int, seed: int, *, size: int = 256, kinds: tuple[str, ...] = THIN_KINDS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` (image (size, size, 3) uint8, mask (size, size) bool) pairs, one object each.

    Sample i has kind kinds[i % len(kinds)] and its own random stream seeded by (seed, i), so the
    output is a pure function of the arguments and a longer list extends a shorter one.
    """
    if size < 32:
        raise ValueError("size must be at least 32 pixels")
    unknown = set(kinds) - set(THIN_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be taken from {THIN_KINDS}, got {kinds}")
    return [
        render_thin_structure(kinds[i % len(kinds)], np.random.default_rng([seed, i]), size)
        for i in range(count)
    ]


def render_thin_structure(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample of the given kind: (image, mask)."""
    scale = size / 256.0
    segments = _fit(_GEOMETRY[kind](rng, scale), rng, size)
    mask = _rasterize(segments, size, 1)
    coverage = _rasterize(segments, size, SUPERSAMPLING)
    coverage = coverage.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))
    background = _background(rng, size)
    colour = _object_colour(rng, background)
    shade = colour + rng.normal(0.0, 4.0, size=(size, size, 3))  # slight texture on the object too
    alpha = coverage[..., None]
    image = background * (1.0 - alpha) + shade * alpha
    image += rng.normal(0.0, rng.uniform(1.0, 6.0), size=image.shape)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


# ---------------------------------------------------------------------------------------------------
# Geometry: arrays of segments (K, 5) = x0, y0, x1, y1, width, in arbitrary units except the width
# (pixels); `_fit` maps the points into the image.


def _polyline(points: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    widths = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(points) - 1,))
    return np.column_stack([points[:-1], points[1:], widths])


def _wire(rng: np.random.Generator, scale: float) -> np.ndarray:
    """One long wire: a smooth meandering curve, or a polyline bent at a few sharp corners."""
    width = rng.uniform(1.5, 3.5) * scale
    if rng.random() < 0.5:
        steps = int(rng.integers(120, 260))
        heading, curvature = rng.uniform(0, 2 * math.pi), 0.0
        points = [np.zeros(2)]
        for _ in range(steps):
            curvature = 0.92 * curvature + rng.normal(0.0, 0.025)
            heading += curvature
            points.append(points[-1] + [math.cos(heading), math.sin(heading)])
        return _polyline(np.array(points), width)
    corners = rng.uniform(0.0, 1.0, size=(int(rng.integers(3, 7)), 2))
    return _polyline(corners, width)


def _ellipse(center: np.ndarray, a: float, b: float, angle: float, vertices: int) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, vertices + 1)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.column_stack([center[0] + c * x - s * y, center[1] + s * x + c * y])


def _rings(rng: np.random.Generator, scale: float) -> np.ndarray:
    """An elliptic ring, optionally with an inner ring and spokes (a wheel); always connected."""
    width = rng.uniform(1.5, 4.0) * scale
    center = np.zeros(2)
    a, b, angle = 1.0, rng.uniform(0.5, 1.0), rng.uniform(0, math.pi)
    parts = [_polyline(_ellipse(center, a, b, angle, 160), width)]
    style = rng.integers(3)  # 0: plain ring, 1: spokes to the centre, 2: inner ring with spokes
    if style:
        inner = rng.uniform(0.3, 0.6) if style == 2 else 0.0
        if style == 2:
            parts.append(_polyline(_ellipse(center, a * inner, b * inner, angle, 120), width))
        spokes = int(rng.integers(2, 7))
        for t in rng.uniform(0, 2 * math.pi) + np.arange(spokes) * 2 * math.pi / spokes:
            c, s = math.cos(angle), math.sin(angle)
            x, y = a * math.cos(t), b * math.sin(t)
            outer = np.array([c * x - s * y, s * x + c * y])
            parts.append(_polyline(np.stack([outer * inner, outer]), width))
    return np.concatenate(parts)


def _mesh(rng: np.random.Generator, scale: float) -> np.ndarray:
    """A rotated lattice of slightly wavy lines (a net or fence); every line crosses all others."""
    width = rng.uniform(1.5, 3.0) * scale
    half_w, half_h = 1.0, rng.uniform(0.5, 1.0)
    wobble = rng.uniform(0.0, 0.04)
    angle = rng.uniform(0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    t = np.linspace(-1.0, 1.0, 24)
    parts = []
    for axis, half_across, half_along in ((0, half_w, half_h), (1, half_h, half_w)):
        for offset in np.linspace(-half_across, half_across, int(rng.integers(3, 9))):
            along = t * half_along
            across = offset + wobble * np.sin(rng.uniform(2, 6) * along + rng.uniform(0, 2 * math.pi))
            x, y = (across, along) if axis == 0 else (along, across)
            parts.append(_polyline(np.column_stack([c * x - s * y, s * x + c * y]), width))
    return np.concatenate(parts)


def _tree(rng: np.random.Generator, scale: float) -> np.ndarray:
    """A branching tree: each branch a slightly bent stroke ending in 2-3 thinner, shorter children."""
    depth = int(rng.integers(3, 6))
    segments: list[np.ndarray] = []

    def grow(start: np.ndarray, heading: float, length: float, width: float, level: int) -> None:
        points = [start]
        for _ in range(3):
            heading += rng.normal(0.0, 0.12)
            points.append(points[-1] + length / 3 * np.array([math.cos(heading), math.sin(heading)]))
        segments.append(_polyline(np.array(points), width))
        if level == depth:
            return
        for _ in range(int(rng.integers(2, 4))):
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.9)
            grow(
                points[-1],
                heading + turn,
                length * rng.uniform(0.55, 0.8),
                max(1.5 * scale, width * 0.75),
                level + 1,
            )

    grow(np.zeros(2), -math.pi / 2 + rng.normal(0.0, 0.3), 1.0, rng.uniform(3.0, 5.0) * scale, 1)
    return np.concatenate(segments)


_GEOMETRY = {"lines": _wire, "rings": _rings, "meshes": _mesh, "branches": _tree}


def _fit(segments: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Scale and move the points (aspect kept, optionally mirrored) into a random box of the image."""
    points = segments[:, :4].reshape(-1, 2)
    if rng.random() < 0.5:
        points = points * [-1.0, 1.0]
    low, high = points.min(axis=0), points.max(axis=0)
    extent = max(float((high - low).max()), 1e-6)
    target = rng.uniform(0.5, 0.85) * size
    scaled = (points - low) * (target / extent)
    span = scaled.max(axis=0)
    margin = 0.06 * size
    origin = [rng.uniform(margin, max(margin, size - margin - span[k])) for k in range(2)]
    fitted = segments.copy()
    fitted[:, :4] = (scaled + origin).reshape(-1, 4)
    return fitted


# ---------------------------------------------------------------------------------------------------
# Rendering


def _split(segments: np.ndarray, piece: float) -> np.ndarray:
    """Cut segments longer than `piece` pixels into equal parts (keeps the stroked area unchanged)."""
    out = []
    for x0, y0, x1, y1, width in segments:
        parts = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / piece))
        t = np.linspace(0.0, 1.0, parts + 1)
        xs, ys = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
        out.append(np.column_stack([xs[:-1], ys[:-1], xs[1:], ys[1:], np.full(parts, width)]))
    return np.concatenate(out) if out else np.zeros((0, 5))


def _rasterize(segments: np.ndarray, size: int, samples: int) -> np.ndarray:
    """(size * samples)^2 bool grid: sample (i, j) at ((j + .5) / samples, (i + .5) / samples) pixels
    is inside when within half a width of some segment (round caps, so joints are seamless)."""
    n = size * samples
    inside = np.zeros((n, n), dtype=bool)
    for x0, y0, x1, y1, width in _split(segments, _PIECE):
        r = width / 2
        # sample k sits at (k + 0.5) / samples: the window holds every sample within r of the segment
        kx0 = max(0, math.floor((min(x0, x1) - r) * samples - 0.5))
        kx1 = min(n, math.ceil((max(x0, x1) + r) * samples - 0.5) + 1)
        ky0 = max(0, math.floor((min(y0, y1) - r) * samples - 0.5))
        ky1 = min(n, math.ceil((max(y0, y1) + r) * samples - 0.5) + 1)
        if kx0 >= kx1 or ky0 >= ky1:
            continue
        px = (np.arange(kx0, kx1) + 0.5) / samples - x0
        py = (np.arange(ky0, ky1) + 0.5)[:, None] / samples - y0
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        inside[ky0:ky1, kx0:kx1] |= (px - t * dx) ** 2 + (py - t * dy) ** 2 <= r * r
    return inside


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float texture: a blend of two colours by smooth value noise, plus stripes or
    a second finer noise layer."""
    first, second = rng.uniform(0, 255, size=(2, 3))
    grid = int(rng.integers(2, 10))
    weights = _smooth_noise(rng, grid, size)
    texture = first * (1 - weights[..., None]) + second * weights[..., None]
    if rng.random() < 0.5:
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40) * size / 256
        y, x = np.mgrid[0:size, 0:size]
        phase = 2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period
        texture += rng.uniform(5, 30) * np.sin(phase + rng.uniform(0, 2 * math.pi))[..., None]
    else:
        texture += rng.uniform(10, 40) * (
            _smooth_noise(rng, int(rng.integers(16, 48)), size)[..., None] - 0.5
        )
    return np.clip(texture, 0, 255)


def _smooth_noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    values = torch.from_numpy(rng.random((1, 1, grid, grid)))
    return (
        F.interpolate(values, size=(size, size), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1).numpy()
    )


def _luminance(colour: np.ndarray) -> np.ndarray:
    return colour @ np.array([0.299, 0.587, 0.114])


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour whose luminance differs from the background's mean by at least 60 levels."""
    mean = float(_luminance(background.reshape(-1, 3).mean(axis=0)))
    for _ in range(32):
        colour = rng.uniform(0, 255, size=3)
        if abs(float(_luminance(colour)) - mean) >= 60:
            return colour
    return np.full(3, 255.0 if mean < 128 else 0.0)

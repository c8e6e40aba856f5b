"""The thin-structure generator: deterministic, one thin connected object per image, exact masks."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hqsam.hqsam_core.metrics import boundary_dilation
from hqsam.hqsam_core.testing.thin_structures import THIN_KINDS, _rasterize, generate_thin_structures


@pytest.fixture(scope="module")
def samples():
    return generate_thin_structures(12, seed=4)


def test_deterministic_and_seeded(samples):
    # same arguments, same pairs; sample i depends on (seed, i) only, so a shorter list is a prefix
    again = generate_thin_structures(4, seed=4)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(again, samples))
    other = generate_thin_structures(2, seed=5)
    assert not any(np.array_equal(a[1], b[1]) for a, b in zip(other, samples))


def test_shapes_and_types(samples):
    assert len(samples) == 12
    for image, mask in samples:
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert mask.shape == (256, 256) and mask.dtype == bool
    image, mask = generate_thin_structures(1, seed=0, size=128)[0]
    assert image.shape == (128, 128, 3) and mask.shape == (128, 128)


def _erode(mask: np.ndarray, d: int) -> np.ndarray:
    """Erosion by a (2d+1)^2 square, the outside of the image counting as background."""
    x = torch.from_numpy(~mask).float()[None, None]
    return ~(F.max_pool2d(F.pad(x, (d, d, d, d), value=1.0), 2 * d + 1, stride=1)[0, 0] > 0).numpy()


def _flood(mask: np.ndarray, seeds: np.ndarray, diagonal: bool) -> np.ndarray:
    """Pixels of `mask` reachable from the `seeds` pixels (4- or 8-connected), by breadth-first search."""
    h, w = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if diagonal else [])
    reached = seeds & mask
    queue = deque(map(tuple, np.argwhere(reached)))
    while queue:
        r, c = queue.popleft()
        for dr, dc in steps:
            rr, cc = r + dr, c + dc
            if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not reached[rr, cc]:
                reached[rr, cc] = True
                queue.append((rr, cc))
    return reached


def _connected(mask: np.ndarray) -> bool:
    """Whether the foreground is one 8-connected component."""
    start = np.zeros_like(mask)
    start[tuple(np.argwhere(mask)[0])] = True
    return bool(_flood(mask, start, diagonal=True).sum() == mask.sum())


def test_objects_are_thin_single_and_boundary_heavy(samples):
    d = boundary_dilation(256, 256, 0.02)
    for index, (_, mask) in enumerate(samples):
        area = mask.mean()
        assert 0.003 < area < 0.12, (index, area)
        # nearly every object pixel lies in the Boundary-IoU band: the metric that HQ-SAM improves
        band = mask & ~_erode(mask, d)
        assert band.sum() / mask.sum() > 0.97, index
        # the structure is thin everywhere: a 2-pixel erosion leaves at most a small core
        assert _erode(mask, 2).sum() < 0.2 * mask.sum(), index
        assert _connected(mask), index
        rows, cols = np.nonzero(mask)
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < 255 and cols.max() < 255  # fully inside


def test_kinds_cycle_and_differ(samples):
    # sample i is of kind THIN_KINDS[i % 4]; rings are closed loops: their hole is enclosed background
    assert len(THIN_KINDS) == 4
    for index in range(1, 12, 4):
        mask = samples[index][1]
        border = np.zeros_like(mask)
        border[0] = border[-1] = border[:, 0] = border[:, -1] = True
        # background 4-connected to the border (the dual of 8-connected foreground)
        outside = _flood(~mask, border, diagonal=False)
        assert (~mask & ~outside).sum() > 100  # enclosed background exists
    lines_only = generate_thin_structures(2, seed=1, kinds=("lines",))
    assert len(lines_only) == 2
    with pytest.raises(ValueError):
        generate_thin_structures(1, seed=1, kinds=("blobs",))


def test_image_is_antialiased_and_mask_is_the_exact_rasterisation():
    # a stroke of width 3 centred on the pixel edge y = 10 spans y in [8.5, 11.5]
    segments = np.array([[4.0, 10.0, 28.0, 10.0, 3.0]])
    mask = _rasterize(segments, 32, 1)
    coverage = _rasterize(segments, 32, 4).reshape(32, 4, 32, 4).mean(axis=(1, 3))
    assert mask[8:12, 10:22].all() and not mask[:8].any() and not mask[12:].any()
    assert np.allclose(coverage[9:11, 10:22], 1.0) and np.allclose(coverage[[8, 11], 10:22], 0.5)
    assert not coverage[:8].any() and not coverage[12:].any()


def test_generated_edges_are_blended(monkeypatch):
    # plain grey background and a white object: pixels are 100 + 150 * coverage (+ noise)
    import hqsam.hqsam_core.testing.thin_structures as thin

    monkeypatch.setattr(thin, "_background", lambda rng, size: np.full((size, size, 3), 100.0))
    monkeypatch.setattr(thin, "_object_colour", lambda rng, background: np.full(3, 250.0))
    for kind in THIN_KINDS:
        image, mask = thin.render_thin_structure(kind, np.random.default_rng(0), 256)
        grey = image.astype(float).mean(axis=2)
        just_outside = ~mask & ~_erode(~mask, 1)
        far_outside = _erode(~mask, 3)
        assert abs(grey[far_outside].mean() - 100) < 1.5
        # partly covered pixels on both sides of the mask's edge; a hard render would give 100 / 250 there
        assert (grey[just_outside] > 115).mean() > 0.08, kind
        assert (grey[mask] < 235).mean() > 0.1, kind
        assert grey[mask].mean() > 200, kind  # pixel centres inside: mostly covered

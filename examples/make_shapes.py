"""Draw the bundled example dataset: a few images of objects with coarse COCO polygons.

The polygons are deliberately rough (few vertices, a little off), the kind of labels that
HQ-SAM refinement is for. Run from the repository root: python examples/make_shapes.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).parent / "shapes"
CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "bar"}, {"id": 3, "name": "ring"}]


def coarse_ellipse(cx: float, cy: float, rx: float, ry: float, vertices: int, rng) -> list[float]:
    points = []
    for k in range(vertices):
        angle = 2 * math.pi * k / vertices
        jitter = 1 + rng.uniform(-0.08, 0.08)
        points += [round(cx + rx * jitter * math.cos(angle), 1), round(cy + ry * jitter * math.sin(angle), 1)]
    return points


def textured_background(width: int, height: int, rng) -> Image.Image:
    noise = rng.integers(90, 170, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((width, height), Image.BICUBIC)
    return image.filter(ImageFilter.GaussianBlur(2))


def main() -> None:
    rng = np.random.default_rng(2024)
    (ROOT / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    sizes = [(640, 480), (480, 640), (800, 600), (512, 512)]
    for image_id, (width, height) in enumerate(sizes, start=1):
        image = textured_background(width, height, rng)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            kind = int(rng.integers(1, 4))
            cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
            rx, ry = rng.uniform(40, 110), rng.uniform(40, 110)
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            if kind == 1:
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
                polygon = coarse_ellipse(cx, cy, rx, ry, 8, rng)
            elif kind == 2:
                draw.rectangle([cx - rx, cy - 12, cx + rx, cy + 12], fill=colour)
                polygon = [
                    cx - rx - 6,
                    cy - 16,
                    cx + rx + 4,
                    cy - 10,
                    cx + rx + 6,
                    cy + 15,
                    cx - rx - 3,
                    cy + 12,
                ]
                polygon = [round(v, 1) for v in polygon]
            else:
                draw.ellipse([cx - rx, cy - rx, cx + rx, cy + rx], outline=colour, width=10)
                polygon = coarse_ellipse(cx, cy, rx + 4, rx + 4, 10, rng)
            xs, ys = polygon[0::2], polygon[1::2]
            x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
            x1, y1 = min(float(width), max(xs)), min(float(height), max(ys))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": kind,
                    "segmentation": [polygon],
                    "bbox": [round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1)],
                    "area": round((x1 - x0) * (y1 - y0), 1),
                    "iscrowd": 0,
                }
            )
        file_name = f"images/shapes_{image_id:02d}.png"
        image.save(ROOT / file_name, optimize=True)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    coco = {
        "info": {"description": "hqsam example: drawn shapes with coarse polygons", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    (ROOT / "annotations.json").write_text(json.dumps(coco, indent=1))


if __name__ == "__main__":
    main()

"""Shapes world: procedural images of coloured shapes with captions, and a checker that scores an image
against the caption it was generated from (GenEval-style: colour, shape, position, count).

Everything is drawn with torch, so the data set costs nothing to store and every test can make its own.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORS = {
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.71, 0.24), "blue": (0.2, 0.31, 0.9),
    "yellow": (0.92, 0.84, 0.16), "purple": (0.6, 0.24, 0.8), "orange": (0.96, 0.55, 0.12),
    "white": (0.94, 0.94, 0.94),
}
BACKGROUND = (0.08, 0.08, 0.1)
SHAPES = ("circle", "square", "triangle")
# 3x3 grid cells: (row, col) -> phrase
POSITIONS = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}
CELL_CENTERS = (0.2, 0.5, 0.8)
NUMBERS = {2: "two", 3: "three"}
RADIUS = 0.12  # of the image side


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str  # "single" | "pair" | "count"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def single_scene(color: str, shape: str, cell: tuple[int, int]) -> Scene:
    return Scene((ShapeObject(color, shape, cell),), f"{_article(color)} {color} {shape} {POSITIONS[cell]}", "single")


def pair_scene(a: ShapeObject, b: ShapeObject) -> Scene:
    caption = (f"{_article(a.color)} {a.color} {a.shape} {POSITIONS[a.cell]} and "
               f"{_article(b.color)} {b.color} {b.shape} {POSITIONS[b.cell]}")
    return Scene((a, b), caption, "pair")


def count_scene(color: str, shape: str, cells: list[tuple[int, int]]) -> Scene:
    return Scene(tuple(ShapeObject(color, shape, c) for c in cells), f"{NUMBERS[len(cells)]} {color} {shape}s", "count")


def is_held_out(color: str, shape: str, cell: tuple[int, int]) -> bool:
    """About one in eight colour-shape-position triples never appears in training, as a single object or in a
    pair, so evaluation can test composition rather than memory."""
    c, s = list(COLORS).index(color), SHAPES.index(shape)
    return (c * 5 + s * 3 + cell[0] * 3 + cell[1]) % 8 == 0


def _all_singles():
    return [(c, s, cell) for c in COLORS for s in SHAPES for cell in POSITIONS]


def scene_pool(split: str, num_pairs: int, seed: int = 0) -> list[Scene]:
    """Fixed list of scenes (so that their LLM encodings can be cached). split: 'train' | 'heldout'."""
    rng = random.Random(seed + (0 if split == "train" else 1))
    keep = (lambda c, s, cell: not is_held_out(c, s, cell)) if split == "train" else is_held_out
    singles = [single_scene(*t) for t in _all_singles() if keep(*t)]
    pairs, seen = [], set()
    candidates = [t for t in _all_singles() if keep(*t)] if split == "train" else _all_singles()
    for _ in range(num_pairs * 50):
        if len(pairs) >= num_pairs:
            break
        a, b = rng.sample(candidates, 2)
        if a[2] == b[2] or (a[0], a[1]) == (b[0], b[1]):
            continue
        if split == "heldout" and not (is_held_out(*a) or is_held_out(*b)):
            continue
        scene = pair_scene(ShapeObject(*a), ShapeObject(*b))
        if scene.caption not in seen:
            seen.add(scene.caption)
            pairs.append(scene)
    counts = []
    if split == "train":
        for c in COLORS:
            for s in SHAPES:
                for n in NUMBERS:
                    counts.append(count_scene(c, s, rng.sample(list(POSITIONS), n)))
    return singles + pairs + counts


def layout_jitter(scene: Scene, rng: random.Random) -> Scene:
    """Count scenes say nothing about position: draw them in fresh cells each time."""
    if scene.kind != "count":
        return scene
    cells = rng.sample(list(POSITIONS), len(scene.objects))
    return Scene(tuple(ShapeObject(o.color, o.shape, c) for o, c in zip(scene.objects, cells)), scene.caption, "count")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> torch.Tensor:
    """Anti-aliased coverage [size, size] in [0, 1] of a shape centred at (cx, cy), in unit coordinates."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    elif shape == "triangle":  # apex up
        rel = (dy + r) / (2 * r)
        inside = (rel >= 0) & (rel <= 1) & (dx.abs() <= r * rel)
    else:
        raise ValueError(f"unknown shape '{shape}'")
    return F.avg_pool2d(inside.float()[None, None], supersample)[0, 0]


def render(scene: Scene, size: int = 32, rng: random.Random | None = None) -> torch.Tensor:
    """[3, size, size] in [0, 1]; rng adds small jitter of position and size."""
    img = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, size, size).clone()
    for obj in scene.objects:
        jx = jy = 0.0
        r = RADIUS
        if rng is not None:
            jx, jy = rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025)
            r *= rng.uniform(0.9, 1.1)
        cx, cy = CELL_CENTERS[obj.cell[1]] + jx, CELL_CENTERS[obj.cell[0]] + jy
        m = shape_mask(obj.shape, cx, cy, r, size)
        color = torch.tensor(COLORS[obj.color]).view(3, 1, 1)
        img = img * (1 - m) + color * m
    return img


# ---------------------------------------------------------------------------------------------------------------
# Checker


def color_map(img: torch.Tensor, color: str, tol: float = 0.28) -> torch.Tensor:
    """Boolean [H, W]: pixels nearer to `color` than `tol` and nearer to it than to any other colour."""
    pix = img.permute(1, 2, 0).float()                                        # [H, W, 3]
    palette = torch.tensor([BACKGROUND] + list(COLORS.values()))               # [K, 3]
    dist = (pix[:, :, None, :] - palette).norm(dim=-1)                         # [H, W, K]
    k = 1 + list(COLORS).index(color)
    return (dist.argmin(-1) == k) & (dist[..., k] < tol)


def components(mask: torch.Tensor, min_pixels: int) -> list[list[tuple[int, int]]]:
    """4-connected components with at least min_pixels pixels."""
    H, W = mask.shape
    seen = torch.zeros_like(mask)
    m = mask.tolist()
    out = []
    for i in range(H):
        for j in range(W):
            if not m[i][j] or seen[i, j]:
                continue
            stack, comp = [(i, j)], []
            seen[i, j] = True
            while stack:
                a, b = stack.pop()
                comp.append((a, b))
                for na, nb in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= na < H and 0 <= nb < W and m[na][nb] and not seen[na, nb]:
                        seen[na, nb] = True
                        stack.append((na, nb))
            if len(comp) >= min_pixels:
                out.append(comp)
    return out


def _cell_of(comp, size: int) -> tuple[int, int]:
    ys = sum(p[0] for p in comp) / len(comp) + 0.5
    xs = sum(p[1] for p in comp) / len(comp) + 0.5
    return min(2, int(ys / size * 3)), min(2, int(xs / size * 3))


def _shape_of(comp, size: int) -> str:
    """Best IoU against the three templates drawn at the component's centre and size."""
    mask = torch.zeros(size, size)
    for a, b in comp:
        mask[a, b] = 1
    cy = (sum(p[0] for p in comp) / len(comp) + 0.5) / size
    cx = (sum(p[1] for p in comp) / len(comp) + 0.5) / size
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        area_unit = {"circle": 3.1416, "square": 4 * 0.85 ** 2, "triangle": 2.0}[shape]
        r = (len(comp) / size ** 2 / area_unit) ** 0.5
        if shape == "triangle":  # the centroid of a triangle sits 1/3 below its apex-to-base midpoint
            cy_t = cy - r / 3
        else:
            cy_t = cy
        t = shape_mask(shape, cx, cy_t, r, size) > 0.5
        iou = (t & (mask > 0)).sum().item() / max(1, (t | (mask > 0)).sum().item())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def check(img: torch.Tensor, scene: Scene) -> dict[str, bool]:
    """Scores one generated image [3, H, W] in [0, 1] against the scene it was asked for.

    Returns per-criterion booleans: color (an object of each asked colour exists), position (it sits in the
    asked cell), shape (its outline matches best the asked shape), count (count scenes: as many objects as
    asked), and overall (all of those that apply).
    """
    size = img.shape[-1]
    min_pixels = max(4, int(0.25 * 3.1416 * (RADIUS * size) ** 2))
    result = {}
    if scene.kind == "count":
        obj = scene.objects[0]
        comps = components(color_map(img, obj.color), min_pixels)
        result["color"] = len(comps) > 0
        result["count"] = len(comps) == len(scene.objects)
        result["shape"] = bool(comps) and all(_shape_of(c, size) == obj.shape for c in comps)
    else:
        colors, positions, shapes = [], [], []
        for obj in scene.objects:
            comps = components(color_map(img, obj.color), min_pixels)
            colors.append(bool(comps))
            in_cell = [c for c in comps if _cell_of(c, size) == obj.cell]
            positions.append(bool(in_cell))
            shapes.append(bool(in_cell) and _shape_of(max(in_cell, key=len), size) == obj.shape)
        result["color"], result["position"], result["shape"] = all(colors), all(positions), all(shapes)
    result["overall"] = all(result.values())
    return result

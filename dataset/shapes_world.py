"""Shapes world: procedural images of coloured shapes, what a caption claims about them, and a checker that
scores an image against those claims (GenEval-style: colour, shape, exact count, position, relation). The words
of the captions are dataset/captions.py's business; this module knows layouts and claims.

Colours: the seven of COLORS, told apart in sRGB, and any colour of PALETTE (a name of the xkcd survey
or a thing's colour, dataset/colour_names.py), judged by CIE76 distance in CIELAB.

Everything is drawn with torch, so the data set costs nothing to store and every test can make its own.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import colour_names

COLORS = {
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.71, 0.24), "blue": (0.2, 0.31, 0.9),
    "yellow": (0.92, 0.84, 0.16), "purple": (0.6, 0.24, 0.8), "orange": (0.96, 0.55, 0.12),
    "white": (0.94, 0.94, 0.94),
}
BACKGROUND = (0.08, 0.08, 0.1)
# Colours beyond the seven, keyed by name (the xkcd survey's) or by a thing's word (a colour described, "the color
# of the sky"): what a caption may ask for. The seven keep the world's own values where a name is the same word.
OPEN_COLORS = {**{c.name: c.rgb for c in colour_names.read_colour_list()},
               **{t.colour.name: t.colour.rgb for t in colour_names.read_things()}}
PALETTE = {**OPEN_COLORS, **COLORS}
# The background is dark, so that the seven colours' images and checker stay comparable across models; a colour
# nearer to it than this reads as background, so no caption asks for one (black, charcoal, dark brown, ...).
MIN_BACKGROUND_DE = 25.0
SHAPES = ("circle", "square", "triangle")
# 3x3 grid cells: (row, col) -> canonical phrase
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
    color: str  # a key of PALETTE
    shape: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Mention:
    """One noun phrase of a caption: exactly `count` objects of one colour and shape, in `cell` when the caption
    says where (None: anywhere). The mentions of a scene have different colours, so that the checker can tell
    them apart by colour alone."""
    color: str
    shape: str
    count: int = 1
    cell: tuple[int, int] | None = None


@dataclass(frozen=True)
class Relation:
    """The caption says mention `subject` is `relation` (a key of RELATIONS) mention `object`."""
    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Scene:
    """A layout (what is drawn) and its caption, with what the caption claims (what the checker checks)."""
    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str  # "single" | "pair" | "relation" | "count" | "triple"
    mentions: tuple[Mention, ...] = ()
    relations: tuple[Relation, ...] = ()


# Relations between two cells (row, col) of the 3x3 grid, read strictly so that a caption never says one of them
# when it is a matter of opinion: "left of" only when the column is smaller; "next to" only for side-by-side
# objects (same row, neighbouring columns).
RELATIONS = {
    "left of": lambda a, b: a[1] < b[1],
    "right of": lambda a, b: a[1] > b[1],
    "above": lambda a, b: a[0] < b[0],
    "below": lambda a, b: a[0] > b[0],
    "next to": lambda a, b: a[0] == b[0] and abs(a[1] - b[1]) == 1,
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# The canonical phrasing (the default workflow's prompts); dataset/captions.py makes all the others.
def single_scene(color: str, shape: str, cell: tuple[int, int]) -> Scene:
    return Scene((ShapeObject(color, shape, cell),), f"{_article(color)} {color} {shape} {POSITIONS[cell]}", "single",
                 (Mention(color, shape, 1, cell),))


def pair_scene(a: ShapeObject, b: ShapeObject) -> Scene:
    caption = (f"{_article(a.color)} {a.color} {a.shape} {POSITIONS[a.cell]} and "
               f"{_article(b.color)} {b.color} {b.shape} {POSITIONS[b.cell]}")
    return Scene((a, b), caption, "pair", (Mention(a.color, a.shape, 1, a.cell), Mention(b.color, b.shape, 1, b.cell)))


def count_scene(color: str, shape: str, cells: list[tuple[int, int]]) -> Scene:
    return Scene(tuple(ShapeObject(color, shape, c) for c in cells), f"{NUMBERS[len(cells)]} {color} {shape}s", "count",
                 (Mention(color, shape, len(cells)),))


# ---------------------------------------------------------------------------------------------------------------
# Combination split: what never appears in training, whatever the wording (dataset/captions.py splits wordings)


def is_held_out(color: str, shape: str, cell: tuple[int, int]) -> bool:
    """About one in eight colour-shape-position triples never appears in training, as a single object or in a
    pair, so evaluation can test composition rather than memory. Only the seven colours have held-out triples."""
    if color not in COLORS:
        return False
    c, s = list(COLORS).index(color), SHAPES.index(shape)
    return (c * 5 + s * 3 + cell[0] * 3 + cell[1]) % 8 == 0


def is_held_out_pair(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """About one in nine pairs of (colour, shape) of the seven colours never appear together in a training caption."""
    if a[0] not in COLORS or b[0] not in COLORS:
        return False
    i, j = sorted(list(COLORS).index(c) * len(SHAPES) + SHAPES.index(s) for c, s in (a, b))
    return (i * 7 + j * 3) % 9 == 4


def is_held_out_count(color: str, shape: str, count: int) -> bool:
    """About one in seven (colour, shape, number) of the seven colours never appear as a count in a training
    caption."""
    if color not in COLORS:
        return False
    return (list(COLORS).index(color) * 3 + SHAPES.index(shape) * 2 + count) % 7 == 0


def states_held_out(scene: Scene) -> bool:
    """The caption asks for a held-out combination: a triple it places, a pair it names together, or a count."""
    m = scene.mentions
    return (any(x.cell is not None and is_held_out(x.color, x.shape, x.cell) for x in m)
            or any(is_held_out_pair((a.color, a.shape), (b.color, b.shape)) for i, a in enumerate(m) for b in m[i + 1:])
            or any(x.count > 1 and is_held_out_count(x.color, x.shape, x.count) for x in m))


def shows_held_out(objects) -> bool:
    """The layout draws a held-out triple (training images never do, even where the caption does not say where)."""
    return any(is_held_out(o.color, o.shape, o.cell) for o in objects)


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
        color = torch.tensor(PALETTE[obj.color]).view(3, 1, 1)
        img = img * (1 - m) + color * m
    return img


# ---------------------------------------------------------------------------------------------------------------
# Checker


def color_map(img: torch.Tensor, color: str, tol: float = 0.28) -> torch.Tensor:
    """Boolean [H, W]: pixels nearer to `color` (one of the seven) than `tol` and nearer to it than to any other of
    the seven colours or the background."""
    pix = img.permute(1, 2, 0).float()                                        # [H, W, 3]
    palette = torch.tensor([BACKGROUND] + list(COLORS.values()))               # [K, 3]
    dist = (pix[:, :, None, :] - palette).norm(dim=-1)                         # [H, W, K]
    k = 1 + list(COLORS).index(color)
    return (dist.argmin(-1) == k) & (dist[..., k] < tol)


# Any colour (OPEN_COLORS) is judged in CIELAB: dE 10 reads as the same colour, 25 as a near hue.
FOREGROUND_DE = 12.0      # a pixel this far from the background is part of something drawn
OPEN_COLOR_TOL_DE = 25.0  # a drawn pixel within this of an asked colour (and nearest to it) is that colour


def open_color_maps(img: torch.Tensor, colors: list[str]) -> list[torch.Tensor]:
    """Boolean [H, W] per colour: pixels within OPEN_COLOR_TOL_DE of it and nearer to it than to the background
    or to any other of the given colours (the mentions of one scene, which captions keep far apart)."""
    lab = colour_names.srgb_to_lab(img.permute(1, 2, 0))                      # [H, W, 3]
    palette = colour_names.srgb_to_lab(torch.tensor([BACKGROUND] + [PALETTE[c] for c in colors]))  # [K, 3]
    dist = (lab[:, :, None, :] - palette).norm(dim=-1)                         # [H, W, K]
    nearest = dist.argmin(-1)
    return [(nearest == k) & (dist[..., k] < OPEN_COLOR_TOL_DE) for k in range(1, len(colors) + 1)]


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


def _min_pixels(size: int) -> int:
    return max(4, int(0.25 * 3.1416 * (RADIUS * size) ** 2))  # a quarter of a circle's area: no stray pixels


def _inner(blob: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pixels of a blob whose four neighbours are in it too: its fill without the rim."""
    pixels = set(blob)
    return [(a, b) for a, b in blob if {(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)} <= pixels]


MIN_INNER_PIXELS = 3  # an open colour's blob has a fill: the anti-aliased rim of a brighter shape of its hue has none


def detect(img: torch.Tensor, colors) -> list[ShapeObject]:
    """The objects of the given colours in an image [3, H, W] in [0, 1]: one per connected blob of the colour
    big enough to be a shape, with the cell of its centre and its best-matching outline. The seven colours are
    told apart in sRGB; any other colour by CIELAB distance (open_color_maps), as blobs with
    a fill."""
    size, colors = img.shape[-1], list(dict.fromkeys(colors))
    if all(c in COLORS for c in colors):
        blobs = [(c, components(color_map(img, c), _min_pixels(size))) for c in colors]
    else:
        blobs = [(c, [b for b in components(mask, _min_pixels(size)) if len(_inner(b)) >= MIN_INNER_PIXELS])
                 for c, mask in zip(colors, open_color_maps(img, colors))]
    return [ShapeObject(color, _shape_of(comp, size), _cell_of(comp, size)) for color, comps in blobs for comp in comps]


def color_errors(img: torch.Tensor, scene: Scene) -> list[float | None]:
    """Per mention, the CIE76 dE between its asked colour and the colour drawn for it; None when nothing is drawn.

    What is drawn: the blobs of pixels at least FOREGROUND_DE from the background, big enough to be a shape, and
    their inner pixels (the fill). Touching objects make one blob, so its inner pixels are split by the mention
    whose colour each is nearest to; a mention's colour is the per-channel median of its part (at least
    MIN_INNER_PIXELS) in the blob where that is nearest to the asked colour, else the median of the whole blob
    nearest to it in colour."""
    lab = colour_names.srgb_to_lab(img.permute(1, 2, 0))
    background = colour_names.srgb_to_lab(torch.tensor(BACKGROUND))
    blobs = components((lab - background).norm(dim=-1) > FOREGROUND_DE, _min_pixels(img.shape[-1]))
    if not blobs:
        return [None] * len(scene.mentions)
    asked = colour_names.srgb_to_lab(torch.tensor([PALETTE[m.color] for m in scene.mentions]))   # [M, 3]
    errors = torch.full((len(asked),), float("inf"))
    whole = torch.full((len(asked),), float("inf"))
    for blob in blobs:
        inner = _inner(blob) or blob
        pixels = lab[[a for a, _ in inner], [b for _, b in inner]]                                 # [P, 3]
        whole = torch.minimum(whole, (asked - pixels.median(0).values).norm(dim=-1))
        nearest = (pixels[:, None] - asked[None]).norm(dim=-1).argmin(1)
        for m in range(len(asked)):
            part = pixels[nearest == m]
            if len(part) >= MIN_INNER_PIXELS:
                errors[m] = min(errors[m], (asked[m] - part.median(0).values).norm())
    return torch.where(errors.isinf(), whole, errors).tolist()


def verdict(objects, scene: Scene) -> dict[str, bool]:
    """Whether the objects (drawn or detected) make the scene's caption true, criterion by criterion.

    color: an object of every mentioned colour exists; count: exactly as many objects of that colour as the
    caption says ("a" means one); shape: every object of that colour has the mentioned shape (in several-object
    scenes this is attribute binding); position (when the caption places something): an object of the colour
    sits in the said cell; relation (when the caption relates objects): it holds for every pair of their objects;
    overall: all of those that apply.
    """
    of = [[o for o in objects if o.color == m.color] for m in scene.mentions]
    result = {"color": all(of), "shape": all(objs and all(o.shape == m.shape for o in objs)
                                             for m, objs in zip(scene.mentions, of)),
              "count": all(len(objs) == m.count for m, objs in zip(scene.mentions, of))}
    if any(m.cell is not None for m in scene.mentions):
        result["position"] = all(any(o.cell == m.cell for o in objs)
                                 for m, objs in zip(scene.mentions, of) if m.cell is not None)
    if scene.relations:
        result["relation"] = all(of[r.subject] and of[r.object] and
                                 all(RELATIONS[r.relation](a.cell, b.cell) for a in of[r.subject] for b in of[r.object])
                                 for r in scene.relations)
    result["overall"] = all(result.values())
    return result


def check(img: torch.Tensor, scene: Scene) -> dict[str, bool]:
    """Scores one generated image [3, H, W] in [0, 1] against the scene it was asked for (see verdict): the same
    rules that decide whether a caption is true of its layout, applied to the objects found in the image."""
    return verdict(detect(img, [m.color for m in scene.mentions]), scene)

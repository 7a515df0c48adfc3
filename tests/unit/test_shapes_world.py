"""adapters.shapes_world: rendering, the checker, and the train / held-out split."""
from __future__ import annotations

import random

import pytest
import torch

from adapters.shapes_world import (
    COLORS,
    POSITIONS,
    SHAPES,
    ShapeObject,
    check,
    count_scene,
    is_held_out,
    layout_jitter,
    pair_scene,
    render,
    scene_pool,
    shape_mask,
    single_scene,
)

CELLS = list(POSITIONS)


def other(values, value, offset=1):
    values = list(values)
    return values[(values.index(value) + offset) % len(values)]


def sample_scenes(kind: str, n: int, seed: int = 0):
    pool = [s for s in scene_pool("train", 60) + scene_pool("heldout", 30) if s.kind == kind]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def draw(scene, seed: int = 0, size: int = 32):
    """Rendered as the trainer renders its data: with small random jitter of position and size.

    (Without jitter, 32-px squares in the four corner cells lose their corner pixels to anti-aliasing and the
    checker reads them as circles.)"""
    return render(scene, size, random.Random(seed))


def single_samples(n: int = 21, seed: int = 0):
    rng = random.Random(seed)
    return [(c, s, rng.choice(CELLS)) for c in COLORS for s in SHAPES][:n]


# ---------------------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("size", [16, 32, 33])
def test_render_shape_and_range(size):
    scene = pair_scene(ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "triangle", (2, 2)))
    img = render(scene, size, random.Random(0))
    assert img.shape == (3, size, size)
    assert img.min() >= 0 and img.max() <= 1


def test_render_places_the_colour_in_the_asked_cell():
    img = render(single_scene("green", "square", (0, 2)), 30)
    third = 10
    corner, center = img[:, :third, 2 * third:], img[:, third:2 * third, third:2 * third]
    green = torch.tensor(COLORS["green"]).view(3, 1, 1)
    assert (corner - green).norm(dim=0).lt(0.05).sum() > 10
    assert (center - green).norm(dim=0).lt(0.05).sum() == 0


def test_shape_masks_have_the_expected_areas():
    r, size = 0.2, 64
    areas = {s: shape_mask(s, 0.5, 0.5, r, size).sum().item() / size ** 2 for s in SHAPES}
    assert areas["circle"] == pytest.approx(3.1416 * r * r, rel=0.05)
    assert areas["square"] == pytest.approx((1.7 * r) ** 2, rel=0.05)
    assert areas["triangle"] == pytest.approx(2 * r * r, rel=0.05)
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", 0.5, 0.5, r, size)


def test_captions():
    assert single_scene("orange", "circle", (1, 1)).caption == "an orange circle in the center"
    assert count_scene("red", "square", [(0, 0), (2, 2)]).caption == "two red squares"
    pair = pair_scene(ShapeObject("red", "circle", (0, 0)), ShapeObject("white", "square", (1, 2)))
    assert pair.caption == "a red circle in the top left corner and a white square on the right"


def test_layout_jitter_moves_only_count_scenes():
    rng = random.Random(0)
    single = single_scene("red", "circle", (0, 0))
    assert layout_jitter(single, rng) is single
    counts = count_scene("red", "circle", [(0, 0), (0, 1), (0, 2)])
    layouts = {tuple(o.cell for o in layout_jitter(counts, rng).objects) for _ in range(10)}
    assert len(layouts) > 1
    for layout in layouts:
        assert len(set(layout)) == 3


# ---------------------------------------------------------------------------------------------------------------
# Checker: passes the ground truth ...


@pytest.mark.parametrize("kind, n", [("single", 40), ("pair", 30), ("count", 30)])
def test_checker_passes_ground_truth(kind, n):
    rng = random.Random(1)
    scenes = sample_scenes(kind, n)
    assert len(scenes) == n
    passed = sum(check(render(layout_jitter(s, rng), 32, rng), s)["overall"] for s in scenes)
    assert passed / n >= 0.95


def test_checker_reports_every_criterion():
    scene = single_scene("red", "circle", (1, 1))
    assert check(draw(scene), scene) == {"color": True, "position": True, "shape": True, "overall": True}
    counts = count_scene("blue", "square", [(0, 0), (2, 2)])
    assert check(draw(counts), counts) == {"color": True, "count": True, "shape": True, "overall": True}


def test_blank_image_fails():
    scene = single_scene("red", "circle", (1, 1))
    result = check(torch.zeros(3, 32, 32), scene)
    assert result["color"] is False and result["overall"] is False


# ---------------------------------------------------------------------------------------------------------------
# ... and fails a wrong one


@pytest.mark.parametrize("color, shape, cell", single_samples())
def test_checker_fails_wrong_colour(color, shape, cell):
    img = draw(single_scene(color, shape, cell))
    result = check(img, single_scene(other(COLORS, color), shape, cell))
    assert not result["color"] and not result["overall"]


@pytest.mark.parametrize("color, shape, cell", single_samples(seed=1))
def test_checker_fails_wrong_position(color, shape, cell):
    img = draw(single_scene(color, shape, cell))
    result = check(img, single_scene(color, shape, other(CELLS, cell, 4)))
    assert result["color"] and not result["position"] and not result["overall"]


@pytest.mark.parametrize("color, shape, cell", single_samples(seed=2))
@pytest.mark.parametrize("offset", [1, 2])
def test_checker_fails_wrong_shape(color, shape, cell, offset):
    img = draw(single_scene(color, shape, cell))
    result = check(img, single_scene(color, other(SHAPES, shape, offset), cell))
    assert result["color"] and result["position"] and not result["shape"] and not result["overall"]


@pytest.mark.parametrize("drawn, asked", [(2, 3), (3, 2)])
@pytest.mark.parametrize("color, shape", [("red", "circle"), ("yellow", "square"), ("purple", "triangle")])
def test_checker_fails_wrong_count(color, shape, drawn, asked):
    cells = [(0, 0), (1, 1), (2, 2)]
    img = draw(count_scene(color, shape, cells[:drawn]))
    result = check(img, count_scene(color, shape, [(0, 2), (2, 0), (1, 0)][:asked]))
    assert result["color"] and not result["count"] and not result["overall"]


def test_checker_fails_swapped_pair():
    a, b = ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "square", (2, 2))
    img = draw(pair_scene(a, b))
    swapped = pair_scene(ShapeObject("red", "circle", (2, 2)), ShapeObject("blue", "square", (0, 0)))
    assert check(img, pair_scene(a, b))["overall"]
    result = check(img, swapped)
    assert result["color"] and not result["position"] and not result["overall"]


# ---------------------------------------------------------------------------------------------------------------
# Split


def triples(scene):
    return {(o.color, o.shape, o.cell) for o in scene.objects}


def test_held_out_triples_are_a_minority_and_recombinable():
    every = [(c, s, cell) for c in COLORS for s in SHAPES for cell in CELLS]
    held = [t for t in every if is_held_out(*t)]
    assert 0 < len(held) < len(every) / 4
    kept = set(every) - set(held)
    for c, s, cell in held:  # each part of a held-out triple is seen in training in other combinations
        assert any((c, s) == (c2, s2) for c2, s2, _ in kept)
        assert any((s, cell) == (s2, cell2) for _, s2, cell2 in kept)
        assert any((c, cell) == (c2, cell2) for c2, _, cell2 in kept)


def test_train_and_heldout_singles_are_disjoint():
    train = scene_pool("train", 50)
    heldout = scene_pool("heldout", 30)
    train_singles = set().union(*(triples(s) for s in train if s.kind == "single"))
    held_singles = set().union(*(triples(s) for s in heldout if s.kind == "single"))
    assert held_singles and train_singles
    assert not train_singles & held_singles
    assert all(is_held_out(*t) for t in held_singles)
    assert not any(is_held_out(*t) for t in train_singles)


def test_train_pairs_contain_no_held_out_triple():
    pairs = [s for s in scene_pool("train", 80) if s.kind == "pair"]
    assert len(pairs) == 80
    assert not any(is_held_out(*t) for s in pairs for t in triples(s))


def test_heldout_pairs_contain_a_held_out_triple():
    pairs = [s for s in scene_pool("heldout", 40) if s.kind == "pair"]
    assert len(pairs) == 40
    assert all(any(is_held_out(*t) for t in triples(s)) for s in pairs)
    assert all(s.objects[0].cell != s.objects[1].cell for s in pairs)


def test_pools_are_deterministic_and_unique():
    a, b = scene_pool("train", 40, seed=3), scene_pool("train", 40, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    pairs = [s.caption for s in a if s.kind == "pair"]
    assert len(set(pairs)) == len(pairs)
    assert not [s for s in scene_pool("heldout", 10) if s.kind == "count"]
    counts = [s for s in a if s.kind == "count"]
    assert len(counts) == len(COLORS) * len(SHAPES) * 2

"""evaluation/colour_probe.py: the linear probe of what an LLM's states say about colour words."""
from __future__ import annotations

import torch

from evaluation import colour_probe


def test_probe_sets_keep_held_out_colours_out_of_the_fit_and_apart_from_each_other():
    sets = colour_probe.colour_sets()
    keys = {name: {k for k, _ in items} for name, items in sets.items()}
    held = set().union(*(v for name, v in keys.items() if name != "train"))
    assert not keys["train"] & held
    for column in ("held-out names", "held-out descriptions"):
        assert keys[f"validation {column}"] and keys[f"test {column}"]
        assert not keys[f"validation {column}"] & keys[f"test {column}"]
    assert all(d for _, d in sets["test held-out descriptions"])
    assert colour_probe.probe_caption("sky", True) == "a circle the color of the sky"
    assert colour_probe.probe_caption("navy", False) == "a navy circle"


def test_ridge_recovers_a_linear_map_and_shrinks_with_strength():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g) * 3 + 1
    w = torch.randn(16, 3, generator=g)
    y = x @ w + 5
    fit = colour_probe.ridge_fit(x, y, 1e-6)
    assert torch.allclose(fit(x), y, atol=1e-3)
    strong = colour_probe.ridge_fit(x, y, 1e6)
    assert torch.allclose(strong(x), y.mean(0).expand_as(y), atol=0.05)  # all shrunk: the intercept is left

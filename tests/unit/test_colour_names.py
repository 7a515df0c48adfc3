"""dataset.colour_names: the xkcd colour list, CIELAB and CIE76, the held-out names."""
from __future__ import annotations

import math

import pytest
import torch

from dataset.colour_names import (delta_e, held_out_names, held_out_things, hue_order, read_colour_list,
                                   read_things, srgb_to_lab, usable_names)


@pytest.mark.parametrize("rgb, lab", [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),      # reference values of sRGB red, green and blue (D65)
    ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
    ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),
])
def test_srgb_to_lab_matches_reference_values(rgb, lab):
    torch.testing.assert_close(srgb_to_lab(torch.tensor(rgb)), torch.tensor(lab), atol=0.06, rtol=0)


def test_delta_e_is_a_distance_that_tells_dark_colours_apart():
    a, b = torch.tensor([0.0, 0.08, 0.24]), torch.tensor([0.4, 0.0, 0.13])  # navy, maroon
    assert delta_e(a, a).item() == 0
    assert delta_e(a, b).item() == pytest.approx(delta_e(b, a).item())
    assert delta_e(a, b).item() > 25
    batch = delta_e(torch.stack([a, b]), a)
    assert batch.shape == (2,) and batch[0] == 0


def test_the_shipped_list_is_the_surveys_949_names():
    colours = read_colour_list()
    assert len(colours) == 949 and len({c.name for c in colours}) == 949
    named = {c.name: c.rgb for c in colours}
    assert named["navy"] == (1 / 255, 21 / 255, 62 / 255) and named["beige"] == (230 / 255, 218 / 255, 166 / 255)


def test_a_broken_line_is_named(tmp_path):
    path = tmp_path / "colours.txt"
    path.write_text("# a list\nsky\t#82cafc\ngrass #5cac2d\n")
    with pytest.raises(ValueError, match=r"colours.txt, line 3: .*'name<TAB>#rrggbb'"):
        read_colour_list(str(path))
    path.write_text("sky\t#82cafz\n")
    with pytest.raises(ValueError, match=r"line 1: not an sRGB colour"):
        read_colour_list(str(path))


def test_usable_names_are_plain_words_neither_crude_nor_taken():
    usable = {c.name for c in usable_names(read_colour_list(), reserved={"red", "cobalt"})}
    assert {"navy", "dusty rose", "beige"} <= usable
    assert not {"red", "cobalt", "grey/green", "robin's egg", "puke green", "baby poop"} & usable
    assert 850 < len(usable) < 949


def test_held_out_names_are_a_fifth_spread_over_every_hue():
    colours = usable_names(read_colour_list(), reserved=set())
    held = held_out_names(colours)
    assert abs(len(held) / len(colours) - 0.2) < 0.01
    lab = srgb_to_lab(torch.tensor([c.rgb for c in colours]))
    sectors = {}
    for c, (L, a, b) in zip(colours, lab.tolist()):
        if math.hypot(a, b) > 10:  # chromatic colours only: a grey's hue angle is noise
            sectors.setdefault(int(math.degrees(math.atan2(b, a)) % 360 // 45), []).append(c.name in held)
    assert len(sectors) == 8
    for flags in sectors.values():
        assert 0.1 < sum(flags) / len(flags) < 0.3
    assert [c.name for c in hue_order(colours)] != [c.name for c in colours]


def test_described_things_take_the_surveys_colour_for_their_word():
    things = read_things()
    named = {c.name: c.rgb for c in read_colour_list()}
    assert len(things) >= 40 and len({t.colour.name for t in things}) == len(things)
    for thing in things:
        assert thing.colour.name in thing.phrase
        assert thing.colour.rgb == named.get(thing.colour.name, thing.colour.rgb)
    assert sum(t.colour.name not in named for t in things) == 1  # snow, from CSS
    held = held_out_things(things)
    assert 0.2 < len(held) / len(things) < 0.3

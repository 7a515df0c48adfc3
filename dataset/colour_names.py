"""Colour names with their sRGB values, and the distance that scores a drawn colour against a named one.

The names are the xkcd colour survey's (dataset/data/xkcd-colors.txt, CC0, source in its header); things whose
colour everyone knows, for colours described rather than named, are in dataset/data/colour-of-things.txt. A colour is
scored by CIE76: the Euclidean distance dE between two colours in CIELAB (D65 white), where about 2 is the least
difference people see, 10 reads as the same colour, 25 as a near hue and 60 or more as another colour.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
XKCD_FILE = os.path.join(DATA, "xkcd-colors.txt")
THINGS_FILE = os.path.join(DATA, "colour-of-things.txt")

# Words that name nothing anyone asks a picture for: the survey kept what people typed.
CRUDE = re.compile(r"\b(shit|poo|poop|puke|vomit|barf|snot|booger|piss|diarrhea)\b")

# sRGB (linear) -> CIE XYZ, and the D65 white point: IEC 61966-2-1.
SRGB_TO_XYZ = torch.tensor([[0.4124, 0.3576, 0.1805],
                            [0.2126, 0.7152, 0.0722],
                            [0.0193, 0.1192, 0.9505]])
D65_WHITE = (0.95047, 1.0, 1.08883)


@dataclass(frozen=True)
class NamedColour:
    name: str
    rgb: tuple[float, float, float]  # sRGB in [0, 1]


@dataclass(frozen=True)
class ColouredThing:
    phrase: str          # as a caption says it: "the sky", "a banana", "grass"
    colour: NamedColour  # named by the thing's word


def parse_hex(value: str) -> tuple[float, float, float]:
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
        raise ValueError(f"not an sRGB colour '#rrggbb': {value!r}")
    return tuple(int(value[i:i + 2], 16) / 255 for i in (1, 3, 5))


def _rows(path: str, columns: str) -> list[list[str]]:
    """The tab-separated rows of a data file ('#' starts a comment line), each with the fields `columns` names."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\n").split("\t")
            try:
                if len(fields) != columns.count("<TAB>") + 1:
                    raise ValueError(f"{len(fields)} fields")
                parse_hex(fields[-1])
            except ValueError as e:
                raise ValueError(f"{os.path.basename(path)}, line {number}: {e}; expected '{columns}'") from e
            rows.append(fields)
    return rows


def read_colour_list(path: str = XKCD_FILE) -> list[NamedColour]:
    """Every colour of a list file (name, tab, #rrggbb per line), in its order."""
    return [NamedColour(name, parse_hex(value)) for name, value in _rows(path, "name<TAB>#rrggbb")]


def read_things(path: str = THINGS_FILE) -> list[ColouredThing]:
    """Every thing of a things file (phrase, tab, word, tab, #rrggbb per line), in its order."""
    return [ColouredThing(phrase, NamedColour(word, parse_hex(value)))
            for phrase, word, value in _rows(path, "phrase<TAB>word<TAB>#rrggbb")]


def usable_names(colours: list[NamedColour], reserved: set[str]) -> list[NamedColour]:
    """The names a caption can use: plain words (no '/' or apostrophe, which the caption language's words never
    have), none crude, and none that the caption language already gives another colour (`reserved`: the base
    colours' words, which keep the world's own values)."""
    return [c for c in colours if re.fullmatch(r"[a-z]+( [a-z]+)*", c.name) and not CRUDE.search(c.name)
            and c.name not in reserved]


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] sRGB in [0, 1] -> [..., 3] CIELAB (L in 0-100), D65 white."""
    rgb = rgb.float().clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ SRGB_TO_XYZ.T / torch.tensor(D65_WHITE)
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1 / 3), (kappa * xyz + 16) / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(rgb_a: torch.Tensor, rgb_b: torch.Tensor) -> torch.Tensor:
    """CIE76 dE between sRGB colours [..., 3] (broadcast)."""
    return (srgb_to_lab(rgb_a) - srgb_to_lab(rgb_b)).norm(dim=-1)


def hue_order(colours: list[NamedColour]) -> list[NamedColour]:
    """By CIELAB hue angle, then lightness: neighbours in the list are neighbours in colour."""
    lab = srgb_to_lab(torch.tensor([c.rgb for c in colours]))
    keys = [(math.atan2(b, a) % (2 * math.pi), L) for L, a, b in lab.tolist()]
    return [c for _, c in sorted(zip(keys, colours), key=lambda kc: kc[0])]


def held_out_names(colours: list[NamedColour], every: int = 5) -> set[str]:
    """Every `every`-th name in hue order: a share of the names spread over all hues, never in a training caption."""
    return {c.name for i, c in enumerate(hue_order(colours)) if i % every == every // 2}


def held_out_things(things: list[ColouredThing], every: int = 4) -> set[str]:
    """Every `every`-th thing's word in hue order: described colours that no training caption describes, and
    whose word no training caption uses as a colour name either (else the picture would teach the word)."""
    return held_out_names([t.colour for t in things], every)

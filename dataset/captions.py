"""Caption language of the shapes world: many true phrasings of every scene, and the split by wording.

A scene of 1 to 3 objects is said through a sentence template filled with synonyms of its colours, shapes,
positions and relations, a quantifier ("a", "one", "a single") or a count (words, digits, "a pair of") and an
optional frame ("a picture of ...", "... on a dark background"). Relations are read off the layout with
shapes_world.RELATIONS, so every caption is true of its image; shapes_world.verdict is the judge.

Two splits keep things out of training:
  wording      HELD_OUT_WORDS below: synonyms, and the fixed words of some templates. No training caption contains
               one; an evaluation prompt that does is an "unseen wording".
  combination  shapes_world.states_held_out / shows_held_out: colour-shape-position triples, pairs of objects
               and counts that no training caption asks for and no training image shows.

Colours beyond the seven (OPEN_NAMES and THINGS below): a colour name of the xkcd survey ("a dusty rose circle")
or a thing whose colour everyone knows ("a circle the color of the sky"), keyed as shapes_world.PALETTE keys them.
A third split keeps a fifth of them, spread over the hues, out of every training caption (HELD_OUT_COLORS).

The trainer draws its captions from training_pool (a fixed list, so that their LLM features are computed once)
and a fresh layout for each sample (relayout): the captions are finite, the (image, caption) pairs are not.
"""
from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import dataclass

import torch

from adapters.word_encoder import words

from . import colour_names
from .shapes_world import (BACKGROUND, COLORS, MIN_BACKGROUND_DE, PALETTE, POSITIONS, RELATIONS, SHAPES, Mention,
                           Relation, Scene, ShapeObject, shows_held_out, states_held_out, verdict)

# Kept out of training, here and nowhere else: a caption with any of these words is an unseen wording. Every
# colour, shape, position and relation keeps at least two seen phrasings.
HELD_OUT_WORDS = frozenset({
    "scarlet", "cobalt", "violet", "tangerine",                  # colours: red, blue, purple, orange
    "disc", "discs", "block", "blocks", "pyramid", "pyramids",   # shapes: circle, square, triangle
    "upper", "lower", "centre",                                  # positions ("in the upper left corner", ...)
    "beneath", "beside",                                         # relations
    "3",                                                         # a count in digits ("2" is seen)
    "photo",                                                     # the frame "a photo of ..."
    "placed", "while", "it", "its", "colored",                   # the templates that use these words
})

KINDS = ("single", "pair", "relation", "count", "triple")
# Columns of the evaluation: (wording, combination) of its prompts.
SPLITS = {"seen": ("seen", "seen"), "unseen combination": ("seen", "unseen"),
          "unseen wording": ("unseen", "seen"), "both unseen": ("unseen", "unseen")}

# The first phrasing of each is the canonical one (shapes_world.single_scene).
COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "green": ("green", "emerald", "grass green"),
    "blue": ("blue", "azure", "cobalt"), "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "amethyst", "violet"), "orange": ("orange", "amber", "tangerine"),
    "white": ("white", "ivory", "snow white"),
}
SHAPE_WORDS = {  # (singular, plural)
    "circle": (("circle", "circles"), ("dot", "dots"), ("round shape", "round shapes"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes"), ("pyramid", "pyramids")),
}
POSITION_WORDS = {
    (0, 0): ("in the top left corner", "at the top left", "in the upper left corner"),
    (0, 1): ("at the top", "at the top center", "in the upper middle"),
    (0, 2): ("in the top right corner", "at the top right", "in the upper right corner"),
    (1, 0): ("on the left", "on the left side", "on the left side of the picture", "at the left edge"),
    (1, 1): ("in the center", "in the middle", "in the center of the picture", "in the centre"),
    (1, 2): ("on the right", "on the right side", "on the right side of the picture", "at the right edge"),
    (2, 0): ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    (2, 1): ("at the bottom", "at the bottom center", "in the lower middle"),
    (2, 2): ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next to": ("next to", "side by side with", "beside"),
}
# "Y with X on its left": the relation said from Y's side (a held-out template: "it" and "its" are held out)
ITS_RELATION = {"left of": "on its left", "right of": "on its right", "above": "above it", "below": "below it",
                "next to": "next to it"}
QUANTIFIERS = ("a", "one", "a single")
COUNT_WORDS = {2: ("two", "2", "a pair of"), 3: ("three", "3")}
FRAMES = ("a picture of {}", "an image of {}", "a drawing of {}", "{} on a dark background",
          "a picture of {} on a dark background", "a photo of {}")
FRAME_SHARE = 0.5  # of captions with a frame
# 'full': every phrasing above. 'canonical': the first phrasing of each word list and template set only, no frame
# and no held-out word: one caption per scene, the narrow language of a weak text encoder's base model, onto which
# an LLM Diff Adapter trained on the full language adds what the base cannot read.
LANGUAGES = ("full", "canonical")

# Sentence templates. Object x (a, b, c: in layout order) is {x} (quantifier, colour, shape) with {pos_x}, or a
# count {n_x} {color_x} {shapes_x}; {rel} / {its_rel} relate a to b. Mention order follows the text.
TEMPLATES = {
    "single": ("{a} {pos_a}", "{pos_a}, {a}", "{a}", "{a} placed {pos_a}"),
    "pair": ("{a} {pos_a} and {b} {pos_b}", "{a} {pos_a}, {b} {pos_b}", "{pos_a}, {a}, and {pos_b}, {b}",
             "{a} {pos_a} while {b} is {pos_b}"),
    "relation": ("{a} {rel} {b}", "{a} is {rel} {b}", "{b} with {a} {its_rel}"),
    "count": ("{n_a} {color_a} {shapes_a}", "{n_a} {shapes_a} colored {color_a}"),
    "triple": ("{a} {pos_a}, {b} {pos_b} and {c} {pos_c}", "{a} {pos_a}, {b} {pos_b}, {c} {pos_c}"),
    "count and one": ("{n_a} {color_a} {shapes_a} and {b}", "{b} and {n_a} {color_a} {shapes_a}"),
}
CELLS = list(POSITIONS)


# ---------------------------------------------------------------------------------------------------------------
# Colours beyond the seven


@functools.lru_cache(maxsize=None)
def _lab(key: str) -> torch.Tensor:
    return colour_names.srgb_to_lab(torch.tensor(PALETTE[key]))


def _visible(key: str) -> bool:
    """At least MIN_BACKGROUND_DE from the background, so that a drawn object of the colour can be found."""
    return bool((_lab(key) - colour_names.srgb_to_lab(torch.tensor(BACKGROUND))).norm() >= MIN_BACKGROUND_DE)


def _open_names() -> tuple[str, ...]:
    """The survey's names a caption can say: plain words, none crude (colour_names.usable_names); none that the
    seven colours' words already give another colour ("red", "lemon", "snow white") and none with a held-out word
    ("cobalt blue"), so that the other splits stay what they are; at most three words ("blue with a hint of purple"
    is a sentence); and visible on the background."""
    taken = {w for phrases in COLOR_WORDS.values() for p in phrases for w in [p, *p.split()]}
    return tuple(c.name for c in colour_names.usable_names(colour_names.read_colour_list(), taken)
                 if len(c.name.split()) <= 3 and not HELD_OUT_WORDS.intersection(c.name.split())
                 and _visible(c.name))


OPEN_NAMES = _open_names()
# a thing's word (its PALETTE key) -> the noun phrase a description says ("the sky"), for things visible on the
# background
THINGS = {t.colour.name: t.phrase for t in colour_names.read_things() if _visible(t.colour.name)}
DESCRIPTION = "the color of {}"
# Never in a training caption, named or described: every fifth name and every fourth thing in hue order (a
# held-out thing's word is held out as a name too, or training pictures would teach it).
HELD_OUT_COLORS = frozenset(
    colour_names.held_out_names([colour_names.NamedColour(n, PALETTE[n]) for n in OPEN_NAMES])
    | colour_names.held_out_things([colour_names.ColouredThing(p, colour_names.NamedColour(w, PALETTE[w]))
                                    for w, p in THINGS.items()]))
MIN_MENTION_DE = 30.0  # the colours of one scene are this far apart (CIE76), so that a checker tells them apart


@dataclass(frozen=True)
class OpenColors:
    """Which colours beyond the seven a scene's objects may take, and how its caption says them. share: of the
    scene's groups of objects (at least one), or None for exactly one; described_share: of the open colours of
    single objects, said as a description when the key is a thing (`things`) and by name otherwise."""
    names: tuple[str, ...] = ()
    things: tuple[str, ...] = ()
    share: float | None = 0.5
    described_share: float = 0.25




def _says_held_out(key: str) -> bool:
    """The key is a held-out colour or has one inside its name ("leaf green" when "leaf" is held out): training
    captions never say a held-out colour's words, not even as part of another name."""
    return any(f" {held} " in f" {key} " for held in HELD_OUT_COLORS)


SEEN_OPEN_COLORS = OpenColors(tuple(n for n in OPEN_NAMES if not _says_held_out(n)),
                              tuple(w for w in THINGS if not _says_held_out(w)))
# Every word that a training caption uses to say a colour; a held-out colour none of whose words is here reaches
# a model without an LLM as unknown words only ("carmine", "mocha"), where "dark mint" reaches it as known ones.
TRAINED_COLOR_WORDS = frozenset(
    w for text in (*SEEN_OPEN_COLORS.names, *(THINGS[k] for k in SEEN_OPEN_COLORS.things),
                   *(p for phrases in COLOR_WORDS.values() for p in phrases)) for w in text.split())


def has_only_new_words(key: str) -> bool:
    return not TRAINED_COLOR_WORDS.intersection(key.split())


# The evaluation's colour columns: one object of an open colour per prompt, its other objects of the seven.
COLOR_COLUMNS = {
    "seen names": OpenColors(SEEN_OPEN_COLORS.names, share=None),
    "held-out names": OpenColors(tuple(n for n in OPEN_NAMES if n in HELD_OUT_COLORS), share=None),
    "held-out descriptions": OpenColors(things=tuple(w for w in THINGS if w in HELD_OUT_COLORS), share=None,
                                        described_share=1.0),
}


def color_split(scene: Scene) -> str:
    """'base' (the seven colours only), 'held-out' (a colour of HELD_OUT_COLORS) or 'seen'."""
    colors = {m.color for m in scene.mentions}
    if colors <= set(COLORS):
        return "base"
    return "held-out" if colors & HELD_OUT_COLORS else "seen"


def _scene_colors(rng: random.Random, sizes: list[int], open_colors: OpenColors | None):
    """A colour per group (distinct, and at least MIN_MENTION_DE apart) and the set of those said as a description;
    None when this draw does not work out (the caller draws again)."""
    colors = rng.sample(list(COLORS), len(sizes))
    described = set()
    if open_colors is None:
        return colors, frozenset()
    opened = ({rng.randrange(len(sizes))} if open_colors.share is None else
              {i for i in range(len(sizes)) if rng.random() < open_colors.share} or {rng.randrange(len(sizes))})
    for i in opened:
        describe_it = bool(open_colors.things) and sizes[i] == 1 and (
            not open_colors.names or rng.random() < open_colors.described_share)
        if not describe_it and not open_colors.names:
            return None
        colors[i] = rng.choice(open_colors.things if describe_it else open_colors.names)
        if describe_it:
            described.add(colors[i])
    lab = torch.stack([_lab(c) for c in colors])
    if len(set(colors)) < len(colors) or (len(colors) > 1 and torch.pdist(lab).min() < MIN_MENTION_DE):
        return None
    return colors, frozenset(described)


def is_seen_wording(text: str) -> bool:
    return not HELD_OUT_WORDS.intersection(words(text))


def _fixed_words(option) -> str:
    """The words of a phrase, a (singular, plural) pair or a template without its placeholders."""
    return re.sub(r"\{\w*\}", " ", " ".join(option) if isinstance(option, tuple) else option)


def _pick(rng: random.Random, options, wording: str, language: str = "full"):
    """Any option for an unseen-wording caption; only seen ones for a seen-wording caption; the first (canonical)
    one in the canonical language."""
    if language == "canonical":
        return options[0]
    return rng.choice([o for o in options if wording == "unseen" or is_seen_wording(_fixed_words(o))])


def _apart(objects) -> bool:
    """Distinct cells, and objects of one colour never in neighbouring cells: at 32 px they could touch and the
    checker would see one blob."""
    cells = [o.cell for o in objects]
    return len(set(cells)) == len(cells) and not any(
        a.color == b.color and abs(a.cell[0] - b.cell[0]) + abs(a.cell[1] - b.cell[1]) == 1
        for i, a in enumerate(objects) for b in objects[i + 1:])


def _random_groups(rng: random.Random, sizes: list[int], open_colors: OpenColors | None = None
                   ) -> tuple[list[list[ShapeObject]], frozenset[str]] | None:
    """One group of same-coloured, same-shaped objects per size, each group its own colour (_scene_colors), and
    the colours said as a description; None if the draw fails or the objects touch."""
    cells = rng.sample(CELLS, sum(sizes))
    colors = _scene_colors(rng, sizes, open_colors)
    if colors is None:
        return None
    groups = []
    for color, n in zip(colors[0], sizes):
        shape = rng.choice(SHAPES)
        groups.append([ShapeObject(color, shape, cells.pop()) for _ in range(n)])
    return (groups, colors[1]) if _apart([o for g in groups for o in g]) else None


def describe(groups: list[list[ShapeObject]], template_set: str, rng: random.Random, wording: str = "seen",
             kind: str | None = None, language: str = "full", described: frozenset[str] = frozenset()) -> Scene:
    """A caption of the layout (groups as _random_groups makes them) from TEMPLATES[template_set], with the
    claims it makes. wording='seen' uses no held-out word; 'unseen' may (it need not). language (LANGUAGES):
    'canonical' says every scene one way only. A colour beyond the seven is said by its name, or as
    DESCRIPTION of its thing when its key is in `described` (single objects only)."""
    if language not in LANGUAGES:
        raise ValueError(f"caption language must be one of {LANGUAGES}, not {language!r}")
    pick = lambda options: _pick(rng, options, wording, language)  # noqa: E731
    template = pick(TEMPLATES[template_set])
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    values, mentions = {}, {}
    for x, group in zip("abc", groups):
        o = group[0]
        color = pick(COLOR_WORDS[o.color]) if o.color in COLORS else o.color
        singular, plural = pick(SHAPE_WORDS[o.shape])
        if len(group) == 1:
            q = pick(QUANTIFIERS)
            phrase = (f"{singular} {DESCRIPTION.format(THINGS[o.color])}" if o.color in described
                      else f"{color} {singular}")
            values[x] = f"{'an' if q == 'a' and phrase[0] in 'aeiou' else q} {phrase}"
            values[f"pos_{x}"] = pick(POSITION_WORDS[o.cell])
        else:
            values.update({f"n_{x}": pick(COUNT_WORDS[len(group)]), f"color_{x}": color,
                           f"shapes_{x}": plural})
        mentions[x] = Mention(o.color, o.shape, len(group), o.cell if f"pos_{x}" in fields else None)
    relations = []
    if "rel" in fields or "its_rel" in fields:
        a, b = groups[0][0].cell, groups[1][0].cell
        rel = rng.choice([r for r, holds in RELATIONS.items() if holds(a, b)])
        values.update(rel=pick(RELATION_WORDS[rel]), its_rel=ITS_RELATION[rel])
        relations.append(("a", rel, "b"))
    body = template.format(**values)
    if language == "full" and rng.random() < FRAME_SHARE:  # "a picture of ..." only before a noun phrase
        frames = [f for f in FRAMES if f.startswith("{}") or not template.startswith("{pos_")]
        body = pick(frames).format(body)
    # mentions in the order the caption names them (the positional-bias test asks which is followed better)
    order = sorted(mentions, key=lambda x: min(template.index("{%s}" % f) for f in fields
                                               if f == x or f.endswith("_" + x)))
    index = {x: i for i, x in enumerate(order)}
    return Scene(tuple(o for g in groups for o in g), body, kind or template_set, tuple(mentions[x] for x in order),
                 tuple(Relation(index[s], r, index[t]) for s, r, t in relations))


def split_of(scene: Scene) -> tuple[str, str | None]:
    """(wording, combination): 'seen' or 'unseen' each; combination None for a layout that shows a held-out
    triple its caption does not ask for (neither training nor a clean evaluation column)."""
    wording = "seen" if is_seen_wording(scene.caption) else "unseen"
    if states_held_out(scene):
        return wording, "unseen"
    return wording, None if shows_held_out(scene.objects) else "seen"


def generate(rng: random.Random, kind: str, wording: str = "seen", combination: str = "seen",
             tries: int = 10_000, language: str = "full", open_colors: OpenColors | None = None) -> Scene:
    """A random scene of `kind` (KINDS) and a caption of it in the asked split (and caption language), in the
    seven colours or, with open_colors, with colours beyond them."""
    for _ in range(tries):
        template_set, sizes = kind, {"single": [1], "pair": [1, 1], "relation": [1, 1],
                                     "count": [rng.choice((2, 3))], "triple": [1, 1, 1]}[kind]
        if kind == "triple" and rng.random() < 0.5:
            template_set, sizes = "count and one", [2, 1]
        drawn = _random_groups(rng, sizes, open_colors)
        if drawn is None:
            continue
        scene = describe(drawn[0], template_set, rng, wording, kind, language, drawn[1])
        if split_of(scene) == (wording, combination):
            return scene
    raise RuntimeError(f"no {kind} scene with {wording} wording and {combination} combination in {tries} tries")


def training_pool(size: int, seed: int = 0, language: str = "full", open_colors: OpenColors | None = None
                  ) -> list[Scene]:
    """`size` training scenes with distinct captions (seen wording, seen combination), the same number of each
    kind; deterministic for a seed. The canonical language has fewer distinct captions of some kinds than a large
    `size` asks for: the pool then holds all that 50 tries per missing caption find. open_colors: scenes with
    colours beyond the seven (SEEN_OPEN_COLORS: never a held-out one)."""
    rng = random.Random(seed)
    pool, seen = [], set()
    for k, kind in enumerate(KINDS):
        quota = size // len(KINDS) + (k < size % len(KINDS))
        for _ in range(50 * quota):
            if quota == 0:
                break
            scene = generate(rng, kind, language=language, open_colors=open_colors)
            if scene.caption not in seen:
                seen.add(scene.caption)
                pool.append(scene)
                quota -= 1
    return pool


def relayout(scene: Scene, rng: random.Random, tries: int = 50) -> Scene:
    """The same caption over a fresh training layout: stated cells kept, the rest redrawn until the caption is
    true again and no held-out triple shows (the scene itself when no other layout turns up)."""
    stated = {m.cell for m in scene.mentions if m.cell is not None}
    free = [c for c in CELLS if c not in stated]
    for _ in range(tries):
        cells = iter(rng.sample(free, len(free)))
        objects = tuple(ShapeObject(m.color, m.shape, m.cell if m.cell is not None else next(cells))
                        for m in scene.mentions for _ in range(m.count))
        if _apart(objects) and not shows_held_out(objects) and verdict(objects, scene)["overall"]:
            return Scene(objects, scene.caption, scene.kind, scene.mentions, scene.relations)
    return scene

"""Prompt weights for an LLM encoder, in the syntax artists type into ComfyUI.

`(red:1.4) circle` sets a weight, `(a big red circle)` multiplies by 1.1 per pair, `[faint]` divides by 1.1 (the
AUTOMATIC1111 convention ComfyUI leaves as text), `\\(` `\\)` `\\[` `\\]` are the characters themselves. Parentheses
follow ComfyUI's CLIP Text Encode (comfy.sd1_clip.token_weights): an explicit weight replaces the one around it,
and a bracket without its partner is text.

How a weight acts on a causal LLM's hidden states (every block). ComfyUI weights a CLIP token by moving its state
from the state an empty prompt has at that position: z' = z_empty + w (z - z_empty). A causal LLM also writes each
word into every later token (" circle" after "red" is a red circle), so scaling the word's own states alone would
leave its meaning in the rest of the prompt. Here every token moves along the difference the weighted words make:

    other tokens        out = R + sum_g w_g (F_g - R)     R: the prompt with the weighted words deleted
    weighted tokens     out = B + w_g (F_g - B)           B: the prompt with them blanked (a lone space each)
                                                         F_g: the prompt with only the words of weight w_g kept

A weight of 0 deletes the words: the encoding is the prompt without them, which the model has read in training,
whereas blanks in their place are text it never saw. Above 1, what the words add, to their own tokens and to every
later one, is extrapolated. The per-block LayerNorm of an adapter would undo a plain rescaling of a state; a move
between two states changes its direction and survives it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EMPHASIS = 1.1  # ComfyUI's and AUTOMATIC1111's factor per bracket pair

_ESCAPES = {"\\(": "\0\1", "\\)": "\0\2", "\\[": "\0\3", "\\]": "\0\4"}


def _escape(text: str) -> str:
    for typed, kept in _ESCAPES.items():
        text = text.replace(typed, kept)
    return text


def _unescape(text: str) -> str:
    for typed, kept in _ESCAPES.items():
        text = text.replace(kept, typed[1])
    return text


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes text[start] (nested brackets of the same kind counted), or -1."""
    opening, closing = text[start], ")" if text[start] == "(" else "]"
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == opening) - (text[i] == closing)
        if depth == 0:
            return i
    return -1


def _parse(text: str, weight: float) -> list[tuple[str, float]]:
    out, plain, i = [], "", 0
    while i < len(text):
        end = _closing(text, i) if text[i] in "([" else -1
        if end < 0:
            plain += text[i]
            i += 1
            continue
        if plain:
            out.append((plain, weight))
            plain = ""
        inner = text[i + 1:end]
        if text[i] == "[":
            out += _parse(inner, weight / EMPHASIS)
        else:
            inner_weight, colon = weight * EMPHASIS, inner.rfind(":")
            if colon > 0:
                try:
                    inner, inner_weight = inner[:colon], float(inner[colon + 1:])
                except ValueError:
                    pass
            out += _parse(inner, inner_weight)
        i = end + 1
    if plain:
        out.append((plain, weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces; the pieces' texts joined are the prompt the LLM reads."""
    return merge_pieces([(_unescape(t), w) for t, w in _parse(_escape(text), 1.0)])


def merge_pieces(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Neighbouring pieces of one weight joined, empty pieces dropped."""
    merged: list[tuple[str, float]] = []
    for t, w in pieces:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        elif t:
            merged.append((t, w))
    return merged


def has_weights(weights) -> bool:
    """Whether any of the weights differs from 1: a prompt whose weights are all 1 encodes as it always did."""
    return any(w != 1.0 for w in weights)


def token_weights(pieces: list[tuple[str, float]], offsets: list[tuple[int, int]], shift: int = 0) -> list[float]:
    """The weight of each token, from its (start, end) characters in the joined text minus `shift`: the weight of its
    first character that is not a space (a BPE token carries the space before its word)."""
    text = "".join(t for t, _ in pieces)
    chars = [w for t, w in pieces for _ in t]
    out = []
    for start, end in offsets:
        start, end = start + shift, end + shift
        first = next((c for c in range(start, end) if not text[c].isspace()), start)
        out.append(chars[first] if first < len(chars) else 1.0)
    return out


@dataclass
class WeightPlan:
    """The rows to encode for one weighted prompt, and where each of its tokens sits in them."""
    rows: list[list[int]]                # token ids: deleted (R), then blanked (B) if used, then F_g for each group
    index: list[list[int | None]]        # per row: prompt position -> position in that row (None: not in it)
    weights: list[float]                 # per prompt token
    groups: list[float]                  # the distinct weights other than 1
    blank: int | None                    # B's row, None when every weight is 0


def plan_weights(ids: list[int], weights: list[float], filler: int) -> WeightPlan:
    groups = sorted({w for w in weights if w != 1.0})

    def row(keep) -> tuple[list[int], list[int | None]]:
        kept = [p for p in range(len(ids)) if keep(weights[p])]
        where = {p: i for i, p in enumerate(kept)}
        return [ids[p] for p in kept], [where.get(p) for p in range(len(ids))]

    rows, index = map(list, zip(row(lambda w: w == 1.0), *[row(lambda w, g=g: w in (1.0, g)) for g in groups]))
    blank = None
    if any(g != 0.0 for g in groups):
        blank = len(rows)
        rows.append([i if w == 1.0 else filler for i, w in zip(ids, weights)])
        index.append(list(range(len(ids))))
    return WeightPlan(rows, index, weights, groups, blank)


def blend(states: torch.Tensor, plan: WeightPlan) -> torch.Tensor:
    """states: [rows, S, T, D], the plan's rows encoded -> [S, T', D] in float32, T' the tokens of weight other than
    0 (one all-zero token, the unconditional encoding, when there are none)."""
    def at(row: int, p: int) -> torch.Tensor:  # [S, D]
        return states[row, :, plan.index[row][p]].float()

    out = []
    for p, w in enumerate(plan.weights):
        if w == 1.0:
            reference = at(0, p)
            out.append(reference + sum(g * (at(1 + k, p) - reference) for k, g in enumerate(plan.groups)))
        elif w != 0.0:
            blank = at(plan.blank, p)
            out.append(blank + w * (at(1 + plan.groups.index(w), p) - blank))
    if not out:
        return torch.zeros(states.shape[1], 1, states.shape[3])
    return torch.stack(out, dim=1)

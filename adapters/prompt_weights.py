"""Prompt weights for an LLM encoder, in the syntax artists type into ComfyUI.

`(red:1.4) circle` sets a weight, `(a big red circle)` multiplies by 1.1 per pair, `[faint]` divides by 1.1 (the
AUTOMATIC1111 convention ComfyUI leaves as text), `\\(` `\\)` `\\[` `\\]` are the characters themselves. Parentheses
follow ComfyUI's CLIP Text Encode (comfy.sd1_clip.token_weights): an explicit weight replaces the one around it,
and a bracket without its partner is text.

How a weight acts on a causal LLM's hidden states (every block). ComfyUI weights a CLIP token by moving its state
from the state an empty prompt has at that position: z' = z_empty + w (z - z_empty). A causal LLM also writes each
word into every later token (" circle" after "red" is a red circle), so scaling the word's own states alone would
leave its meaning in the rest of the prompt. Here the reference is the whole prompt with the weighted tokens
blanked (each replaced by a filler token, a lone space, so every position keeps its place), and every token moves
along the difference the weighted words make:

    out = R + sum_g w_g (F_g - R)      R: weighted tokens blanked, F_g: only the tokens of weight w_g written

At w = 0 the prompt encodes as if the words were blanked; at w > 1 what they add, to their own tokens and to every
later one, is extrapolated. The per-block LayerNorm of the adapter would undo a plain rescaling of a state; a move
between two states changes its direction and survives it.
"""
from __future__ import annotations

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
    pieces = [(_unescape(t), w) for t, w in _parse(_escape(text), 1.0)]
    merged: list[tuple[str, float]] = []
    for t, w in pieces:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        elif t:
            merged.append((t, w))
    return merged


def has_weights(text: str) -> bool:
    return any(w != 1.0 for _, w in parse_weights(text))


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


def weighted_rows(ids: list[int], weights: list[float], filler: int) -> tuple[list[list[int]], list[float]]:
    """The rows to encode for one prompt: first R (every weighted token replaced by the filler), then F_g for each
    distinct weight w_g (only that weight's tokens written); and the w_g."""
    groups = sorted({w for w in weights if w != 1.0})
    blank = [filler if w != 1.0 else i for i, w in zip(ids, weights)]
    rows = [blank] + [[i if w in (1.0, g) else filler for i, w in zip(ids, weights)] for g in groups]
    return rows, groups


def blend(states: torch.Tensor, groups: list[float]) -> torch.Tensor:
    """states: [1 + G, S, T, D], the rows of weighted_rows -> [S, T, D] = R + sum_g w_g (F_g - R), in float32."""
    reference = states[0].float()
    out = reference.clone()
    for g, weight in enumerate(groups):
        out += weight * (states[1 + g].float() - reference)
    return out

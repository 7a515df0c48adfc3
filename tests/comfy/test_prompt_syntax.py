"""LLM Prompt Encode reads parentheses and escapes as ComfyUI's CLIP Text Encode does (comfy.sd1_clip)."""
import pytest

import tiny_models  # noqa: F401  (sets up ComfyUI for the import below)
import comfy.sd1_clip as sd1_clip  # noqa: E402
from llm_diffusion.adapters.prompt_weights import merge_pieces, parse_weights  # noqa: E402


def comfy_pieces(text: str) -> list[tuple[str, float]]:
    """ComfyUI's own parse, in parse_weights' form."""
    return merge_pieces([(sd1_clip.unescape_important(t), w)
                         for t, w in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0)])


@pytest.mark.parametrize("text", [
    "a red circle", "a (red:1.4) circle", "(a big red circle)", "((red)) circle", "(a (red:0.5) circle)",
    "((red:1.3)) and (blue)", "a \\(red\\) circle", "(red:much) circle", "a (red:0) circle on the (left:1.2)",
    "(a photo of (a (crimson:1.5) disc)) on a dark background", "a (red circle", "",
])
def test_parentheses_and_escapes_parse_as_in_clip_text_encode(text):
    ours, comfy = parse_weights(text), comfy_pieces(text)
    assert [t for t, _ in ours] == [t for t, _ in comfy]
    assert [w for _, w in ours] == pytest.approx([w for _, w in comfy])

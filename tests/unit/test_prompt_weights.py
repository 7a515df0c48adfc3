"""adapters.prompt_weights: ComfyUI's weight syntax, and what a weight does to an LLM's hidden states."""
from __future__ import annotations

import pytest
import torch

from adapters import llm_encoder
from adapters.llm_encoder import encode_prompts
from adapters.prompt_weights import has_weights, parse_weights


@pytest.mark.parametrize("text, pieces", [
    ("a (red:1.4) circle", [("a ", 1.0), ("red", 1.4), (" circle", 1.0)]),
    ("(a big (red) circle)", [("a big ", 1.1), ("red", pytest.approx(1.21)), (" circle", 1.1)]),
    ("((red:0.5)) circle", [("red", 0.5), (" circle", 1.0)]),
    ("[faint] line", [("faint", pytest.approx(1 / 1.1)), (" line", 1.0)]),
    ("a \\(red\\) \\[circle\\]", [("a (red) [circle]", 1.0)]),
    ("a (red circle", [("a (red circle", 1.0)]),
    ("a red) circle]", [("a red) circle]", 1.0)]),
    ("(red:much) circle", [("red:much", 1.1), (" circle", 1.0)]),
    ("(red:0) circle", [("red", 0.0), (" circle", 1.0)]),
    ("a red circle", [("a red circle", 1.0)]),
])
def test_the_syntax_parses_as_comfyui_reads_it(text, pieces):
    assert parse_weights(text) == pieces


def test_only_a_weight_other_than_one_counts():
    assert not has_weights("a (red:1.0) circle") and not has_weights("a \\(red\\) circle")
    assert has_weights("a (red) circle") and has_weights("a [red] circle")


def weighted(model, tok, text, **options):
    return encode_prompts(model, tok, [text], weighted=True, layers="all", **options).hidden_states[0].float()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_prompt_without_weights_encodes_exactly_as_without_the_syntax(arch, llm_loader):
    model, tok = llm_loader(arch)
    for text, plain in (("a red circle on the left", "a red circle on the left"),
                        ("a (red:1) circle", "a red circle"), ("", "")):
        enc = encode_prompts(model, tok, [text], weighted=True, layers="all")
        ref = encode_prompts(model, tok, [plain], layers="all")
        assert torch.equal(enc.hidden_states, ref.hidden_states) and torch.equal(enc.attention_mask,
                                                                                 ref.attention_mask)


@pytest.mark.parametrize("arch", ["llama"])
def test_a_weight_moves_every_token_along_what_the_weighted_words_add(arch, llm_loader):
    """Weight 0 is the prompt with the word blanked (a filler token in its place, so later tokens never see it);
    weight w is R + w (F - R) at every position, the later tokens included."""
    model, tok = llm_loader(arch)
    full = weighted(model, tok, "a red circle on the left")
    blanked_ids = tok("a red circle on the left", add_special_tokens=False)["input_ids"]
    red = tok("a red", add_special_tokens=False)["input_ids"][-1]
    blanked_ids = [llm_encoder.filler_token(tok) if i == red else i for i in blanked_ids]
    prefix = llm_encoder.tokenize_prompts(tok, [], instruction=None, use_chat_template=True, max_tokens=64)[0]
    blanked = llm_encoder.prompt_states(model, prefix, [blanked_ids], list(range(llm_encoder.num_hidden_states(model))),
                                        "cpu", False, None, None, None)[0].float()

    zero = weighted(model, tok, "a (red:0) circle on the left")
    torch.testing.assert_close(zero, blanked, rtol=1e-5, atol=1e-5)
    later = slice(2, None)  # " circle on the left": the weight reaches the tokens after the word
    assert (zero[1:, later] - full[1:, later]).abs().amax() > 1e-3
    for w in (0.5, 1.5, 3.0):
        torch.testing.assert_close(weighted(model, tok, f"a (red:{w}) circle on the left"),
                                   blanked + w * (full - blanked), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama"])
def test_two_weights_add_their_own_moves(arch, llm_loader):
    """Each distinct weight moves the tokens along what its own words add, measured against the prompt with all
    weighted words blanked."""
    model, tok = llm_loader(arch)
    both = weighted(model, tok, "a (red:1.5) circle and a (blue:0.5) square")
    red_only = weighted(model, tok, "a (red:1) circle and a (blue:0) square")
    blue_only = weighted(model, tok, "a (red:0) circle and a (blue:1) square")
    blank = weighted(model, tok, "a (red:0) circle and a (blue:0) square")
    torch.testing.assert_close(both, blank + 1.5 * (red_only - blank) + 0.5 * (blue_only - blank),
                               rtol=1e-4, atol=1e-4)
    assert (red_only - blank).abs().amax() > 1e-3 and (blue_only - blank).abs().amax() > 1e-3


@pytest.mark.parametrize("arch", ["llama"])
def test_weights_work_with_block_contributions_and_in_a_batch(arch, llm_loader):
    model, tok = llm_loader(arch)
    prompts = ["a (red:2) circle", "a blue square on the left", "(green)"]
    batch = encode_prompts(model, tok, prompts, weighted=True, contributions=True)
    for b, p in enumerate(prompts):
        alone = encode_prompts(model, tok, [p], weighted=True, contributions=True)
        n = alone.hidden_states.shape[2]
        torch.testing.assert_close(batch.hidden_states[b:b + 1, :, :n], alone.hidden_states, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(batch.hidden_states).all()
    plain = encode_prompts(model, tok, ["a red circle"], contributions=True).hidden_states[0].float()
    assert (batch.hidden_states[0, :, :3].float() - plain).abs().amax() > 1e-3

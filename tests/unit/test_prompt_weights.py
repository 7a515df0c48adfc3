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
    weights = lambda text: [w for _, w in parse_weights(text)]  # noqa: E731
    assert not has_weights(weights("a (red:1.0) circle")) and not has_weights(weights("a \\(red\\) circle"))
    assert has_weights(weights("a (red) circle")) and has_weights(weights("a [red] circle"))


def weighted(model, tok, text, **options):
    return encode_prompts(model, tok, [text], weighted=True, layers="all", **options).hidden_states[0].float()


def states_of(model, tok, ids: list[int]) -> torch.Tensor:
    """[S, T, D]: every hidden state of these prompt ids after the default prefix."""
    prefix = llm_encoder.tokenize_prompts(tok, [], instruction=None, use_chat_template=True, max_tokens=64)[0]
    picked = list(range(llm_encoder.num_hidden_states(model)))
    return llm_encoder.prompt_states(model, prefix, [ids], picked, "cpu", False, None, None, None)[0].float()


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
    """Weight 0 deletes the word: the encoding of the prompt without it. Weight w moves the later tokens from the
    prompt without the word (R) and the word's own token from a blank in its place (B): R + w (F - R), B + w (F - B)."""
    model, tok = llm_loader(arch)
    ids = tok("a red circle on the left", add_special_tokens=False)["input_ids"]
    red = ids.index(tok("a red", add_special_tokens=False)["input_ids"][-1])
    full = states_of(model, tok, ids)
    deleted = states_of(model, tok, ids[:red] + ids[red + 1:])
    blanked = states_of(model, tok, ids[:red] + [llm_encoder.filler_token(tok)] + ids[red + 1:])

    zero = weighted(model, tok, "a (red:0) circle on the left")
    torch.testing.assert_close(zero, deleted, rtol=1e-5, atol=1e-5)
    later = slice(red + 1, None)
    assert (zero[1:, red:] - full[1:, later]).abs().amax() > 1e-3  # the later tokens lose the word
    for w in (0.5, 1.5, 3.0):
        got = weighted(model, tok, f"a (red:{w}) circle on the left")
        want = full.clone()
        want[:, :red] = deleted[:, :red]
        want[:, red] = blanked[:, red] + w * (full[:, red] - blanked[:, red])
        want[:, later] = deleted[:, red:] + w * (full[:, later] - deleted[:, red:])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama"])
def test_two_weights_add_their_own_moves(arch, llm_loader):
    """Each distinct weight moves the other tokens along what its own words add, against the prompt with every
    weighted word deleted."""
    model, tok = llm_loader(arch)
    both = weighted(model, tok, "a (red:1.5) circle and a (blue:0.5) square")
    red_only = weighted(model, tok, "a (red:1) circle and a (blue:0) square")     # blue deleted
    blue_only = weighted(model, tok, "a (red:0) circle and a (blue:1) square")    # red deleted
    none = weighted(model, tok, "a (red:0) circle and a (blue:0) square")
    # the tokens after both words: " square" (last); red_only and none lack "blue", blue_only and none lack "red"
    want = none[:, -1] + 1.5 * (red_only[:, -1] - none[:, -1]) + 0.5 * (blue_only[:, -1] - none[:, -1])
    torch.testing.assert_close(both[:, -1], want, rtol=1e-4, atol=1e-4)
    assert both.shape[1] == red_only.shape[1] + 1 == blue_only.shape[1] + 1 == none.shape[1] + 2


@pytest.mark.parametrize("arch", ["llama"])
def test_weights_work_with_block_contributions_and_in_a_batch(arch, llm_loader):
    model, tok = llm_loader(arch)
    prompts = ["a (red:2) circle", "a blue square on the left", "(green)", "(green:0)"]
    batch = encode_prompts(model, tok, prompts, weighted=True, contributions=True)
    for b, p in enumerate(prompts):
        alone = encode_prompts(model, tok, [p], weighted=True, contributions=True)
        n = alone.hidden_states.shape[2]
        torch.testing.assert_close(batch.hidden_states[b:b + 1, :, :n], alone.hidden_states, rtol=1e-4, atol=1e-4)
        assert int(batch.attention_mask[b].sum()) == n
    assert torch.isfinite(batch.hidden_states).all()
    assert not batch.hidden_states[3].any() and int(batch.attention_mask[3].sum()) == 1  # nothing left: unconditional
    plain = encode_prompts(model, tok, ["a red circle"], contributions=True).hidden_states[0].float()
    assert (batch.hidden_states[0, :, :3].float() - plain).abs().amax() > 1e-3

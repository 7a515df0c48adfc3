"""adapters.word_encoder: the no-LLM baseline's text encoder and its safetensors file."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from adapters.checkpoint import CheckpointError, load_word_encoder, save_word_encoder
from adapters.word_encoder import PAD, UNK, WordEncoder, build_vocabulary

CAPTIONS = ["a red circle to the left of a blue square", "two green triangles, on a dark background"]


def encoder(dim: int = 8) -> WordEncoder:
    torch.manual_seed(0)
    return WordEncoder(build_vocabulary(CAPTIONS), dim, max_tokens=12)


def test_vocabulary_is_the_training_words():
    vocab = build_vocabulary(CAPTIONS)
    assert vocab[:2] == [PAD, UNK]
    assert {"red", "left", "two", ","} <= set(vocab) and "crimson" not in vocab
    assert vocab == build_vocabulary(reversed(CAPTIONS))  # sorted, not in order of appearance


def test_unknown_words_padding_and_truncation():
    enc = encoder()
    ids, mask = enc.tokenize(["a crimson circle", "a red circle to the left of a blue square on a dark background", ""])
    unk = enc.index[UNK]
    assert ids[0, :3].tolist() == [enc.index["a"], unk, enc.index["circle"]]
    assert mask.tolist()[0] == [1, 1, 1] + [0] * 9 and mask[1].sum() == 12  # cut at max_tokens
    assert mask[2].tolist() == [1] + [0] * 11  # the empty caption is one token ...
    out = enc(ids)
    assert out.shape == (3, 12, 8)
    assert out[2].abs().sum() == 0 and out[0, 3:].abs().sum() == 0  # ... of zeros, like the padding


def test_word_order_matters():
    """Without the position embedding, the refiner (no position of its own) could not tell these apart."""
    enc = encoder()
    ids, _ = enc.tokenize(["a red circle to the left of a blue square", "a blue circle to the left of a red square"])
    out = enc(ids)
    assert not torch.allclose(out[0].mean(0), out[1].mean(0))


def test_save_and_load_round_trip(tmp_path):
    enc = encoder()
    with torch.no_grad():
        enc.embed.weight.add_(1.0)
    path = str(tmp_path / "enc.safetensors")
    save_word_encoder(path, enc)
    loaded, meta = load_word_encoder(path)
    assert loaded.vocabulary == enc.vocabulary and (loaded.dim, loaded.max_tokens) == (8, 12)
    ids, _ = enc.tokenize(CAPTIONS)
    torch.testing.assert_close(loaded(ids), enc(ids), atol=0, rtol=0)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == "word-encoder"
    with pytest.raises(CheckpointError, match="not a word-encoder file"):
        from adapters.checkpoint import save_lidit  # noqa: F401
        from adapters.lidit import LIDiT, LIDiTConfig
        other = str(tmp_path / "lidit.safetensors")
        save_lidit(other, LIDiT(LIDiTConfig(in_channels=3, hidden_size=16, depth=1, num_heads=2, context_dims=(8,))),
                   [])
        load_word_encoder(other)

"""The no-LLM baseline's text encoder: word embeddings learned from scratch over the training vocabulary.

It stands where the LLM and its LLM Diff Adapter stand, and feeds the same LI-DiT context path (token refiner,
cross-attention), so that a comparison at equal data and budget measures what the LLM buys. A word never seen in
training (a held-out synonym, say) becomes <unk>: the baseline cannot know it, which is the honest comparison.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

PAD, UNK = "<pad>", "<unk>"


def words(text: str) -> list[str]:
    """Lower-case words, digits and punctuation marks: the units of the vocabulary (and of the caption language's
    wording split)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def build_vocabulary(captions) -> list[str]:
    return [PAD, UNK] + sorted({w for c in captions for w in words(c)})


class WordEncoder(nn.Module):
    """caption -> [T, dim] tokens: a word embedding plus a learned position embedding (the refiner after it has
    no notion of order, and "a red circle left of a blue square" must differ from its mirror), layer-normalised.
    The empty caption is one all-zero token, as the LLM path's unconditional encoding."""

    def __init__(self, vocabulary: list[str], dim: int, max_tokens: int = 64):
        super().__init__()
        if vocabulary[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD}, {UNK}")
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.dim, self.max_tokens = dim, max_tokens
        self.embed = nn.Embedding(len(vocabulary), dim)
        self.position = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] (right-padded, cut at max_tokens) and the mask [B, T] (1 = token)."""
        unk = self.index[UNK]
        ids = [[self.index.get(w, unk) for w in words(c)][:self.max_tokens] or [0] for c in captions]
        T = max(len(i) for i in ids)
        out = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for b, i in enumerate(ids):
            out[b, :len(i)] = torch.tensor(i)
            mask[b, :len(i)] = 1
        return out, mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, T] -> [B, T, dim]; <pad> (and the empty caption's one token) -> zeros
        x = self.norm(self.embed(ids) + self.position[:ids.shape[1]])
        return x * (ids != 0).unsqueeze(-1).to(x.dtype)


@torch.no_grad()
def copy_known_words(source: WordEncoder, target: WordEncoder) -> int:
    """Fine-tuning onto a caption pool with new words: the target takes the source's positions, norm and the
    embedding of every word both vocabularies hold; its new words keep their fresh initialisation. Returns how many
    words were copied."""
    if (source.dim, source.max_tokens) != (target.dim, target.max_tokens):
        raise ValueError(f"word encoders of other sizes: dim {source.dim} and {target.dim}, max_tokens "
                         f"{source.max_tokens} and {target.max_tokens}")
    target.position.copy_(source.position)
    target.norm.load_state_dict(source.norm.state_dict())
    shared = [w for w in target.vocabulary if w in source.index]
    rows = torch.tensor([target.index[w] for w in shared])
    target.embed.weight[rows] = source.embed.weight[torch.tensor([source.index[w] for w in shared])]
    return len(shared)

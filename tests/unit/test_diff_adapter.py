"""adapters.diff_adapter (LLM Diff Adapter, gated cross-attention) and adapters.conditioning."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adapters.conditioning import hidden_states_to_context
from adapters.diff_adapter import REFINER_HEAD_DIM, GatedCrossAttention, LLMDiffAdapter

D, S, C = 24, 4, 16
RC = 2 * REFINER_HEAD_DIM  # a context size that a refiner takes


def hidden(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Later blocks at a larger scale, as in a real LLM.
    scale = torch.arange(1, S + 1, dtype=torch.float32).view(1, S, 1, 1) ** 2
    return torch.randn(B, S, T, D, generator=g) * scale


def test_output_shape():
    adapter = LLMDiffAdapter(D, S, C)
    assert adapter(hidden(B=3, T=7)).shape == (3, 7, C)


def test_block_weights_are_a_softmax():
    adapter = LLMDiffAdapter(D, S, C)
    torch.testing.assert_close(adapter.block_weights(), torch.full((S,), 1 / S))
    with torch.no_grad():
        adapter.block_logits.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    w = adapter.block_weights()
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w, torch.softmax(adapter.block_logits.detach(), 0))


def test_forward_matches_definition():
    """Each block layer-normalised on its own, mixed by the block weights, then norm + projection."""
    torch.manual_seed(0)
    adapter = LLMDiffAdapter(D, S, C)
    with torch.no_grad():
        adapter.block_logits.normal_()
    h = hidden()
    per_block = [F.layer_norm(h[:, s], (D,)) for s in range(S)]
    fused = sum(w * x for w, x in zip(adapter.block_weights(), per_block))
    torch.testing.assert_close(adapter(h), adapter.proj(adapter.norm(fused)), atol=1e-5, rtol=1e-5)


def test_block_scale_does_not_drown_the_others():
    adapter = LLMDiffAdapter(D, S, C)
    h = hidden()
    louder = h.clone()
    louder[:, -1] *= 1000
    torch.testing.assert_close(adapter(h), adapter(louder), atol=1e-4, rtol=1e-4)


def test_gradient_reaches_block_logits_and_projection():
    adapter = LLMDiffAdapter(D, S, C)
    adapter(hidden()).pow(2).mean().backward()
    for name in ("block_logits", "proj.weight", "proj.bias", "norm.weight"):
        grad = dict(adapter.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("shape, got", [((2, S - 1, 5, D), f"{S - 1} of size {D}"),
                                        ((2, S, 5, D + 8), f"{S} of size {D + 8}")])
def test_shape_mismatch_names_both_shapes(shape, got):
    adapter = LLMDiffAdapter(D, S, C)
    with pytest.raises(ValueError) as err:
        adapter(torch.zeros(shape))
    msg = str(err.value)
    assert f"{S} hidden states of size {D}" in msg
    assert f"gives {got}" in msg


def test_hidden_states_to_context():
    h = hidden(B=2, T=3)
    adapter = LLMDiffAdapter(D, S, C)
    torch.testing.assert_close(hidden_states_to_context(h, adapter), adapter(h))
    side_by_side = hidden_states_to_context(h)
    assert side_by_side.shape == (2, 3, S * D)
    torch.testing.assert_close(side_by_side[:, :, D:2 * D], h[:, 1])
    torch.testing.assert_close(hidden_states_to_context(h[:, -1:]), h[:, -1])


# ---------------------------------------------------------------------------------------------------------------
# GatedCrossAttention


def gca_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 32, generator=g), torch.randn(2, 4, C, generator=g)


def test_fresh_gated_cross_attention_is_identity():
    torch.manual_seed(0)
    gca = GatedCrossAttention(32, C, num_heads=4)
    x, ctx = gca_inputs()
    assert torch.equal(gca(x, ctx), x)
    assert torch.equal(gca(x, ctx, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])), x)


def test_open_gate_changes_x_and_respects_mask():
    torch.manual_seed(0)
    gca = GatedCrossAttention(32, C, num_heads=4)
    with torch.no_grad():
        gca.gate_a.fill_(1.0)
    x, ctx = gca_inputs()
    out = gca(x, ctx)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    garbage = ctx.clone()
    garbage[0, 2:] = 1e3
    torch.testing.assert_close(gca(x, garbage, mask), gca(x, ctx, mask), atol=1e-5, rtol=1e-5)
    # The gate scales the branch by a * exp(b).
    with torch.no_grad():
        gca.gate_b.fill_(1.0)
    torch.testing.assert_close(gca(x, ctx) - x, (out - x) * torch.e, atol=1e-5, rtol=1e-4)


def test_gated_cross_attention_gate_gets_gradient_at_zero():
    gca = GatedCrossAttention(32, C, num_heads=4)
    x, ctx = gca_inputs()
    gca(x, ctx).pow(2).sum().backward()
    assert gca.gate_a.grad is not None and gca.gate_a.grad.abs() > 0


# ---------------------------------------------------------------------------------------------------------------
# DecoupledCrossAttention, HostAdapter, AdaptedLIDiT (an existing model keeps its own text path)

from adapters.checkpoint import CheckpointError, load_host_adapter, save_host_adapter  # noqa: E402
from adapters.diff_adapter import AdaptedLIDiT, DecoupledCrossAttention, HostAdapter, sdpa_attention  # noqa: E402
from adapters.lidit import LIDiT, LIDiTConfig  # noqa: E402


def host_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g), torch.randn(2, 4, C, generator=g))


def test_fresh_decoupled_branch_returns_the_host_output_bit_for_bit():
    branch = DecoupledCrossAttention(32, C)
    q, host, llm = host_inputs()
    assert torch.equal(branch(q, host, llm, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), sdpa_attention(4)), host)


def test_decoupled_gates_mix_both_branches():
    torch.manual_seed(0)
    branch = DecoupledCrossAttention(32, C)
    q, host, llm = host_inputs()
    attn = sdpa_attention(4)
    llm_only = attn(q, branch.to_k(llm), branch.to_v(llm))
    with torch.no_grad():
        branch.llm_gate_a.fill_(0.5)
        branch.host_gate_b.fill_(-1.0)
    want = torch.exp(torch.tensor(-1.0)) * host + 0.5 * llm_only
    torch.testing.assert_close(branch(q, host, llm, None, attn), want)


def branch_output_and_step(kind: str, llm_gate: float):
    """A fresh branch of each kind with this initial gate, its output, and its input (what a closed branch
    returns); the branch's gradients are those of a loss that wants it to add something."""
    torch.manual_seed(0)
    q, host, llm = host_inputs()
    if kind == "decoupled":
        branch = DecoupledCrossAttention(32, C, llm_gate)
        out = branch(q, host, llm, None, sdpa_attention(4))
    else:
        branch = GatedCrossAttention(32, C, num_heads=4, llm_gate=llm_gate)
        out = branch(host, llm)
    (out - host - 1.0).pow(2).sum().backward()
    return out, host, branch


@pytest.mark.parametrize("kind", ["decoupled", "gated"])
def test_open_initial_gate_still_returns_the_host_and_its_value_path_learns_from_the_first_step(kind):
    """llm_gate > 0: the gate starts open and the value (decoupled) or output (gated) projection at zero, so a
    fresh branch is still the host bit for bit, but that projection gets a gradient at once; with the paper's
    closed gate (0) the branch's projections get none."""
    out, base, branch = branch_output_and_step(kind, 1.0)
    assert torch.equal(out, base)
    value = branch.to_v if kind == "decoupled" else branch.to_out
    assert value.weight.grad.abs().sum() > 0
    assert (branch.llm_gate_a if kind == "decoupled" else branch.gate_a).item() == 1.0

    out, base, branch = branch_output_and_step(kind, 0.0)
    assert torch.equal(out, base)
    value = branch.to_v if kind == "decoupled" else branch.to_out
    assert value.weight.grad.abs().sum() == 0
    assert value.weight.abs().sum() > 0  # random, as in the paper


def test_host_adapter_passes_the_initial_gate_to_every_branch():
    for kind in ("decoupled", "gated"):
        host = HostAdapter(D, S, C, [("a", 32, 4), ("b", 32, 4)], kind, llm_gate=0.5)
        for branch in host.branches:
            assert (branch.llm_gate_a if kind == "decoupled" else branch.gate_a).item() == 0.5


@pytest.mark.parametrize("kind", ["decoupled", "gated"])
def test_strength_scales_the_whole_change_so_0_is_the_host_bit_for_bit(kind):
    """Strength scales what the adapter changes, the host gate's share included: at 0 the host model's output
    exactly, at 1 the gates as trained."""
    torch.manual_seed(0)
    q, host, llm = host_inputs()
    attn = sdpa_attention(4)
    if kind == "decoupled":
        module = DecoupledCrossAttention(32, C)
        with torch.no_grad():
            module.llm_gate_a.fill_(0.5)
            module.host_gate_b.fill_(0.1)
        run = lambda s: module(q, host, llm, None, attn, s)  # noqa: E731
        llm_only = attn(q, module.to_k(llm), module.to_v(llm))
        torch.testing.assert_close(run(1.0), torch.exp(torch.tensor(0.1)) * host + 0.5 * llm_only)
    else:
        module = GatedCrossAttention(32, C, num_heads=4)
        with torch.no_grad():
            module.gate_a.fill_(0.5)
        run = lambda s: module(host, llm, None, attn, s)  # noqa: E731
    assert torch.equal(run(0.0), host)
    change = run(1.0) - host
    assert change.abs().mean() > 1e-3
    for strength in (0.5, 2.0, -1.0):
        torch.testing.assert_close(run(strength) - host, strength * change, atol=1e-5, rtol=1e-4)


def test_decoupled_branch_gives_zeros_for_a_prompt_without_tokens():
    branch = DecoupledCrossAttention(32, C)
    with torch.no_grad():
        branch.llm_gate_a.fill_(1.0)
    q, host, llm = host_inputs()
    out = branch(q, host, llm, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), sdpa_attention(4))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], host[1]) and not torch.equal(out[0], host[0])


def tiny_lidit():
    torch.manual_seed(0)
    base = LIDiT(LIDiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=4, context_dims=(16,), refiner_depth=1))
    with torch.no_grad():
        for p in base.parameters():  # adaLN-Zero would make the blocks identities
            p.normal_(0, 0.1)
    return base


def test_adapted_lidit_closed_gates_equal_base_and_gradients_reach_only_the_adapter():
    base = tiny_lidit().requires_grad_(False)
    host = HostAdapter(D, S, C, [(f"block{i}", 32, 4) for i in range(2)], "decoupled")
    model = AdaptedLIDiT(base, host.branches)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    ctx, masks = [torch.randn(2, 5, 16)], [torch.ones(2, 5, dtype=torch.long)]
    llm = host.adapter(hidden(T=6))
    assert torch.equal(model(x, t, ctx + [llm], masks + [torch.ones(2, 6)]), base(x, t, ctx, masks))
    model(x, t, ctx + [llm], masks + [torch.ones(2, 6)]).pow(2).mean().backward()
    assert all(p.grad is None for p in base.parameters())
    grads = {n: p.grad for n, p in host.named_parameters()}
    assert all(grads[f"branches.{i}.llm_gate_a"].abs() > 0 for i in range(2))
    # with the LLM gate closed nothing flows to the LLM side yet; the gate opens first
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "to_k" in n or "adapter." in n)


def test_host_adapter_file_round_trip_and_bad_metadata(tmp_path):
    host = HostAdapter(D, S, C, [("input.1.0", 32, 4), ("middle.0.0", 64, 8)], "decoupled")
    with torch.no_grad():
        host.branches[1].llm_gate_a.fill_(0.25)
    path = str(tmp_path / "host.safetensors")
    save_host_adapter(path, host, "unet", "tiny-llm", extra={"encoder": {"layers": "all"}})
    loaded, info = load_host_adapter(path)
    assert info["family"] == "unet" and info["llm"] == "tiny-llm" and loaded.sites == host.sites
    for (n, a), b in zip(host.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    from safetensors.torch import load_file, save_file
    save_file(load_file(path), path, metadata={**{k: str(v) for k, v in info.items() if k != "sites"},
                                               "format": "llm-host-adapter", "family": "sd-unknown", "sites": "[]"})
    with pytest.raises(CheckpointError, match="broken host metadata"):
        load_host_adapter(path)
    with pytest.raises(CheckpointError, match="not a llm-host-adapter file"):
        load_host_adapter(_plain_adapter(tmp_path))


def _plain_adapter(tmp_path) -> str:
    from adapters.checkpoint import save_adapter
    path = str(tmp_path / "plain.safetensors")
    save_adapter(path, LLMDiffAdapter(D, S, C), "tiny-llm")
    return path


def test_feature_noise_only_while_training():
    adapter = LLMDiffAdapter(D, S, C, feature_noise=0.5)
    clean = LLMDiffAdapter(D, S, C)
    clean.load_state_dict(adapter.state_dict())
    h = hidden()
    torch.testing.assert_close(adapter.eval()(h), clean(h))
    assert (adapter.train()(h) - clean(h)).abs().mean() > 0.1


def _unseen_direction_response(feature_noise: float) -> float:
    """Fits the adapter to a random linear target on states confined to 6 of D directions; returns how far the
    output moves along a direction orthogonal to all of them (and to the constant vector layer norm removes)."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(D, 1), torch.randn(D, 7, generator=g)], 1))
    seen, unseen = basis[:, 1:7], basis[:, 7]
    target = torch.randn(6, C, generator=g)
    torch.manual_seed(0)
    adapter = LLMDiffAdapter(D, S, C, feature_noise=feature_noise)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)

    def states(coords):  # [N, 6] -> [N, S, 1, D]: every block the same single token in the seen subspace
        return (coords @ seen.T)[:, None, None, :].expand(len(coords), S, 1, D)

    for _ in range(300):
        coords = torch.randn(32, 6, generator=g)
        loss = (adapter(states(coords))[:, 0] - coords @ target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.eval()
    x = states(torch.randn(64, 6, generator=g))
    with torch.no_grad():
        return (adapter(x + 0.5 * unseen) - adapter(x)).norm(dim=-1).mean().item()


def test_feature_noise_shrinks_the_response_to_unseen_directions():
    # the reason for the noise: without it, what training never spanned keeps its random projection
    assert _unseen_direction_response(0.5) < 0.5 * _unseen_direction_response(0.0)


def refined_adapter(depth: int = 2) -> LLMDiffAdapter:
    torch.manual_seed(0)
    adapter = LLMDiffAdapter(D, S, RC, refiner_depth=depth).eval()
    with torch.no_grad():  # a fresh refiner's residual gates are zero: open them, as training does
        for block in adapter.refiner.blocks:
            block.adaLN_gates[1].bias.fill_(0.5)
    return adapter


def test_the_refiner_lets_each_token_read_the_words_after_it():
    """Without a refiner each context token is its own LLM state, which a causal LLM computed without the words
    after it; with one, the first token's context changes when the last word does."""
    h = hidden(B=1, T=5)
    later = h.clone()
    later[:, :, -1] = torch.randn(S, D)
    plain = LLMDiffAdapter(D, S, RC)
    assert torch.equal(plain(h)[:, 0], plain(later)[:, 0])
    adapter = refined_adapter()
    assert (adapter(h)[:, 0] - adapter(later)[:, 0]).abs().max() > 1e-3


def test_the_refiner_ignores_padding_and_survives_a_prompt_without_tokens():
    adapter = refined_adapter()
    h = hidden(B=1, T=5)
    padded = torch.cat([h, 100 * torch.randn(1, S, 3, D)], dim=2)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    torch.testing.assert_close(adapter(padded, mask)[:, :5], adapter(h), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(adapter(padded, torch.zeros_like(mask))).all()


def test_hidden_states_to_context_passes_the_mask_to_the_refiner():
    adapter = refined_adapter()
    h = torch.cat([hidden(B=1, T=4), hidden(B=1, T=4, seed=1)], dim=2)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    torch.testing.assert_close(hidden_states_to_context(h, adapter, mask), adapter(h, mask))
    assert not torch.allclose(hidden_states_to_context(h, adapter, mask), adapter(h))


def test_a_refiner_needs_a_context_size_of_whole_heads():
    with pytest.raises(ValueError, match=f"divisible by {REFINER_HEAD_DIM}"):
        LLMDiffAdapter(D, S, REFINER_HEAD_DIM + 8, refiner_depth=1)


def test_host_adapter_with_a_refiner_round_trips_and_a_fresh_one_leaves_the_base_bit_for_bit(tmp_path):
    base = tiny_lidit().requires_grad_(False)
    host = HostAdapter(D, S, RC, [(f"block{i}", 32, 4) for i in range(2)], "decoupled", llm_gate=1.0,
                       refiner_depth=2)
    model = AdaptedLIDiT(base, host.branches)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    ctx, masks = [torch.randn(2, 5, 16)], [torch.ones(2, 5, dtype=torch.long)]
    llm_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    llm = host.adapter(hidden(T=6), llm_mask)
    assert torch.equal(model(x, t, ctx + [llm], masks + [llm_mask]), base(x, t, ctx, masks))

    path = str(tmp_path / "refined.safetensors")
    save_host_adapter(path, host, "lidit", "tiny-llm")
    loaded, info = load_host_adapter(path)
    assert loaded.adapter.refiner_depth == 2 and info["refiner_depth"] == "2"
    for (n, a), b in zip(host.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n

    from safetensors.torch import load_file, save_file
    save_file(load_file(path), path, metadata={**{k: str(v) for k, v in info.items() if k != "sites"},
                                               "format": "llm-host-adapter", "sites": json.dumps(host.sites),
                                               "refiner_depth": "3"})
    with pytest.raises(CheckpointError, match="refiner_depth says 3 but the file holds 2"):
        load_host_adapter(path)


def test_an_adapter_file_from_before_refiners_loads_without_one(tmp_path):
    """Files written before the refiner existed carry no refiner_depth: they load as they always did."""
    from safetensors.torch import load_file, save_file
    from adapters.checkpoint import load_adapter, read_metadata
    path = _plain_adapter(tmp_path)
    meta = read_metadata(path, "llm-diff-adapter")
    del meta["refiner_depth"]
    save_file(load_file(path), path, metadata=meta)
    adapter, _ = load_adapter(path)
    assert adapter.refiner is None


def test_llm_tokens_unpack_what_was_packed_and_padding_says_nothing():
    from adapters.conditioning import llm_token_features, llm_tokens_width, pack_llm_tokens, unpack_llm_tokens
    S, D = 3, 4
    hidden = torch.randn(2, 5, S * D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tokens = pack_llm_tokens(hidden, mask, True)
    assert tokens.shape == (2, 5, llm_tokens_width(S, D))
    unpacked = unpack_llm_tokens(tokens, S, D)
    assert torch.equal(unpacked.states, hidden.view(2, 5, S, D).permute(0, 2, 1, 3))  # [B, S, T, D]
    assert torch.equal(unpacked.mask, mask.bool())
    assert unpacked.contributions.tolist() == [True, True] and unpacked.has_tokens.tolist() == [True, True]
    assert llm_token_features(tokens) == S * D
    padded = torch.cat([pack_llm_tokens(hidden[:1], None, False), torch.zeros(1, 5, S * D + 2)])  # ComfyUI's padding
    unpacked = unpack_llm_tokens(padded, S, D)
    assert unpacked.contributions.tolist() == [False, False] and unpacked.has_tokens.tolist() == [True, False]

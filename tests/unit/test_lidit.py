"""adapters.lidit: the LI-DiT model, its refiners, the flow-matching loss and the Euler sampler."""
from __future__ import annotations

import pytest
import torch

from dataset import shapes_world
from adapters import lidit
from adapters.lidit import (Attention, CollaborativeRefiner, LIDiT, LIDiTConfig, TokenRefiner, flow_matching_loss,
                            forward_bytes, masked_mean, sample_euler, scores_attention, set_attention_kernel)

DIMS = (48, 64)


def tiny_config(**overrides) -> LIDiTConfig:
    cfg = dict(in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
               context_dims=DIMS, refiner_depth=1)
    cfg.update(overrides)
    return LIDiTConfig(**cfg)


def tiny_model(seed: int = 0, **overrides) -> LIDiT:
    torch.manual_seed(seed)
    return LIDiT(tiny_config(**overrides))


def text_inputs(B: int = 2, lengths=(5, 3), dims=DIMS, seed: int = 1):
    """Random LLM streams; stream 0 has a padded first row."""
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randn(B, n, d, generator=g) for n, d in zip(lengths, dims)]
    masks = [torch.ones(B, n, dtype=torch.long) for n in lengths]
    masks[0][0, lengths[0] - 2:] = 0
    return contexts, masks


def image(B=2, H=16, W=16, seed=2):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def pad_stream(contexts, masks, stream: int, extra: int, seed: int = 3):
    """Appends `extra` garbage tokens with mask 0 to one stream."""
    g = torch.Generator().manual_seed(seed)
    c, m = list(contexts), list(masks)
    B, _, D = c[stream].shape
    c[stream] = torch.cat([c[stream], 1e3 * torch.randn(B, extra, D, generator=g)], dim=1)
    m[stream] = torch.cat([m[stream], torch.zeros(B, extra, dtype=m[stream].dtype)], dim=1)
    return c, m


# ---------------------------------------------------------------------------------------------------------------
# Shapes and configuration


@pytest.mark.parametrize("fusion", ["collaborative", "concat"])
@pytest.mark.parametrize("H, W", [(30, 34), (16, 16), (9, 13)])
def test_forward_shape_any_resolution(fusion, H, W, wake):
    model = wake(tiny_model(fusion=fusion))
    contexts, masks = text_inputs()
    out = model(image(H=H, W=W), torch.tensor([0.3, 0.8]), contexts, masks)
    assert out.shape == (2, 3, H, W)
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


def test_single_stream_and_default_masks():
    model = tiny_model(context_dims=(48,))
    contexts, _ = text_inputs(lengths=(4,), dims=(48,))
    out = model(image(), torch.tensor([0.5, 0.5]), contexts)
    assert out.shape == (2, 3, 16, 16)


def test_fresh_model_predicts_zero():
    """adaLN-Zero and the zero-initialised final layer: a new model outputs exactly zero velocity."""
    model = tiny_model()
    contexts, masks = text_inputs()
    assert model(image(), torch.tensor([0.2, 0.9]), contexts, masks).eq(0).all()


def test_wrong_context_dims_are_named():
    model = tiny_model()
    contexts, masks = text_inputs(dims=(48, 32))
    with pytest.raises(ValueError) as err:
        model(image(), torch.tensor([0.5, 0.5]), contexts, masks)
    assert str(DIMS) in str(err.value) and "(48, 32)" in str(err.value)


def test_wrong_number_of_streams_is_refused():
    model = tiny_model()
    contexts, masks = text_inputs(lengths=(5,), dims=(48,))
    with pytest.raises(ValueError, match=r"\(48, 64\)"):
        model(image(), torch.tensor([0.5, 0.5]), contexts, masks)


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="fusion"):
        tiny_config(fusion="sum")
    cfg = tiny_config(context_dims=[48, 64])
    assert cfg.context_dims == DIMS
    assert LIDiTConfig(**cfg.to_dict()) == cfg


def test_masked_mean():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(masked_mean(x, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(masked_mean(x, torch.tensor([[0, 0, 0]])), torch.tensor([[0.0, 0.0]]))


def test_timestep_changes_the_prediction(wake):
    model = wake(tiny_model())
    contexts, masks = text_inputs()
    x = image()
    a = model(x, torch.tensor([0.1, 0.1]), contexts, masks)
    b = model(x, torch.tensor([0.9, 0.9]), contexts, masks)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Refiners


def token_refiner(causal: bool, seed: int = 0) -> TokenRefiner:
    torch.manual_seed(seed)
    return TokenRefiner(48, 32, num_heads=2, depth=2, mlp_ratio=2.0, causal=causal)


def refiner_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 48, generator=g), torch.ones(2, 6), torch.randn(2, 32, generator=g)


def test_fresh_token_refiner_is_identity_after_projection():
    refiner = token_refiner(causal=False)
    tokens, mask, t_emb = refiner_inputs()
    assert torch.equal(refiner(tokens, mask, t_emb), refiner.in_proj(tokens))


def test_causal_refiner_differs_once_gates_are_open(wake):
    bidirectional = wake(token_refiner(causal=False))
    causal = token_refiner(causal=True)
    causal.load_state_dict(bidirectional.state_dict())
    tokens, mask, t_emb = refiner_inputs()
    a, b = bidirectional(tokens, mask, t_emb), causal(tokens, mask, t_emb)
    assert not torch.allclose(a, b, atol=1e-4)
    # Without the open gates both are the same identity.
    fresh_bi, fresh_causal = token_refiner(causal=False), token_refiner(causal=True)
    assert torch.equal(fresh_bi(tokens, mask, t_emb), fresh_causal(tokens, mask, t_emb))


def test_causal_refiner_attention_does_not_look_ahead(wake):
    """With the pooled conditioning fixed, a causal refiner's first token ignores the later tokens."""
    refiner = wake(token_refiner(causal=True))
    tokens, mask, t_emb = refiner_inputs()
    changed = tokens.clone()
    changed[:, -1] += 5.0
    c = t_emb  # bypass pooling: call the blocks directly
    x, y = refiner.in_proj(tokens), refiner.in_proj(changed)
    for block in refiner.blocks:
        x, y = block(x, c, mask, causal=True), block(y, c, mask, causal=True)
    torch.testing.assert_close(x[:, :-1], y[:, :-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x[:, -1], y[:, -1])


def collaborative_pair(wake_fn):
    """A collaborative refiner with open gates and a concat refiner with the same branch weights."""
    torch.manual_seed(0)
    collab = wake_fn(CollaborativeRefiner(tiny_config(fusion="collaborative")))
    concat = CollaborativeRefiner(tiny_config(fusion="concat"))
    concat.load_state_dict(collab.state_dict(), strict=False)
    return collab, concat


def test_collaborative_branches_see_each_other(wake):
    collab, concat = collaborative_pair(wake)
    contexts, masks = text_inputs()
    t_emb = torch.randn(2, 32)
    other = [contexts[0], contexts[1] + 1.0]
    T0 = contexts[0].shape[1]
    a, _ = collab(contexts, masks, t_emb)
    b, _ = collab(other, masks, t_emb)
    assert not torch.allclose(a[:, :T0], b[:, :T0], atol=1e-4)  # stream 0 depends on stream 1
    a, mask = concat(contexts, masks, t_emb)
    b, _ = concat(other, masks, t_emb)
    torch.testing.assert_close(a[:, :T0], b[:, :T0], atol=0, rtol=0)  # concat keeps them apart
    assert a.shape == (2, sum(c.shape[1] for c in contexts), 32)
    assert torch.equal(mask, torch.cat(masks, dim=1))


def test_fresh_collaboration_gate_is_closed():
    torch.manual_seed(0)
    collab = CollaborativeRefiner(tiny_config(fusion="collaborative"))
    concat = CollaborativeRefiner(tiny_config(fusion="concat"))
    concat.load_state_dict(collab.state_dict(), strict=False)
    contexts, masks = text_inputs()
    t_emb = torch.randn(2, 32)
    assert torch.equal(collab(contexts, masks, t_emb)[0], concat(contexts, masks, t_emb)[0])


# ---------------------------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("fusion, causal", [("collaborative", False), ("concat", False), ("collaborative", True)])
@pytest.mark.parametrize("stream", [0, 1])
def test_masked_padding_does_not_change_the_output(fusion, causal, stream, wake):
    model = wake(tiny_model(fusion=fusion, refiner_causal=causal))
    contexts, masks = text_inputs()
    x, t = image(H=12, W=12), torch.tensor([0.3, 0.7])
    reference = model(x, t, contexts, masks)
    padded = model(x, t, *pad_stream(contexts, masks, stream, extra=4))
    assert padded.abs().sum() > 0
    torch.testing.assert_close(padded, reference, atol=1e-5, rtol=1e-4)


def test_masked_tokens_really_are_ignored(wake):
    """Changing a masked token leaves the output alone; changing an unmasked one does not."""
    model = wake(tiny_model())
    contexts, masks = text_inputs()
    x, t = image(H=12, W=12), torch.tensor([0.3, 0.7])
    reference = model(x, t, contexts, masks)
    masked_change = [c.clone() for c in contexts]
    masked_change[0][0, -1] = 77.0  # row 0's last two tokens of stream 0 are padding
    torch.testing.assert_close(model(x, t, masked_change, masks), reference, atol=1e-5, rtol=1e-4)
    visible_change = [c.clone() for c in contexts]
    visible_change[0][0, 0] += 3.0
    assert not torch.allclose(model(x, t, visible_change, masks)[0], reference[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Training signal


@pytest.mark.parametrize("fusion", ["collaborative", "concat"])
def test_every_parameter_learns(fusion):
    model = tiny_model(fusion=fusion)
    initial = {k: p.detach().clone() for k, p in model.named_parameters()}
    contexts, masks = text_inputs()
    x0, t = image(H=12, W=12), torch.tensor([0.4, 0.6])
    before = model(x0, t, contexts, masks).detach()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        loss = flow_matching_loss(model, x0, contexts, masks, generator=g)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # everything is in the graph, even behind the zero-initialised gates
            assert [k for k, p in model.named_parameters() if p.grad is None] == []
        opt.step()
    frozen = [k for k, p in model.named_parameters() if torch.equal(p.detach(), initial[k])]
    assert frozen == []
    assert not torch.allclose(model(x0, t, contexts, masks), before)


def small_overfit_problem():
    scenes = [shapes_world.single_scene(*t) for t in (("red", "circle", (0, 1)), ("red", "square", (1, 0)),
                                                       ("red", "triangle", (2, 0)), ("green", "circle", (2, 2)))]
    x0 = torch.stack([shapes_world.render(s, size=8) for s in scenes]) * 2 - 1
    contexts = [torch.randn(len(scenes), 5, 16, generator=torch.Generator().manual_seed(5))]
    return x0, contexts


def mean_loss(model, x0, contexts, draws=8) -> float:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(flow_matching_loss(model, x0, contexts, None, generator=g).item() for _ in range(draws)) / draws


def test_flow_matching_loss_falls_when_overfitting():
    model = tiny_model(patch_size=2, context_dims=(16,))
    x0, contexts = small_overfit_problem()
    start = mean_loss(model, x0, contexts)
    # A zero prediction scores E|eps - x0|^2 = 1 + E[x0^2].
    assert start == pytest.approx(1 + x0.pow(2).mean().item(), rel=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = flow_matching_loss(model, x0, contexts, None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean_loss(model, x0, contexts) < 0.5 * start


def test_flow_matching_loss_target():
    """With a generator the loss is reproducible, and equals the MSE to eps - x0 at x_t = (1-t) x0 + t eps."""
    model = tiny_model(patch_size=2, context_dims=(16,))
    x0, contexts = small_overfit_problem()
    loss = flow_matching_loss(model, x0, contexts, None, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
    assert (t > 0).all() and (t < 1).all()
    # A fresh model predicts zero velocity, so the loss is |eps - x0|^2 exactly.
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean())


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def test_sample_euler_matches_manual_integration(wake):
    model = wake(tiny_model())
    contexts, masks = text_inputs()
    noise = image(H=12, W=12)
    out = sample_euler(model, noise, contexts, masks, steps=3)
    assert out.shape == noise.shape
    x = noise
    ts = [1.0, 2 / 3, 1 / 3, 0.0]
    with torch.no_grad():
        for a, b in zip(ts, ts[1:]):
            x = x + (b - a) * model(x, torch.full((2,), a), contexts, masks)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-4)


def test_sample_euler_classifier_free_guidance(wake):
    model = wake(tiny_model())
    contexts, masks = text_inputs()
    uncond = [torch.zeros(2, 1, d) for d in DIMS]
    uncond_masks = [torch.ones(2, 1, dtype=torch.long) for _ in DIMS]
    noise = image(H=12, W=12)
    guided = sample_euler(model, noise, contexts, masks, steps=1, cfg=3.0,
                          uncond_contexts=uncond, uncond_masks=uncond_masks)
    with torch.no_grad():
        t = torch.ones(2)
        v_c, v_u = model(noise, t, contexts, masks), model(noise, t, uncond, uncond_masks)
    torch.testing.assert_close(guided, noise - (v_u + 3.0 * (v_c - v_u)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(guided, sample_euler(model, noise, contexts, masks, steps=1))


# ---------------------------------------------------------------------------------------------------------------
# Large images: interruptible forward, memory estimate


class Stop(Exception):
    pass


def test_chunked_forward_is_exact_and_checks_between_blocks_and_chunks(monkeypatch, wake):
    model = wake(tiny_model())
    x, (contexts, masks) = image(H=32, W=32), text_inputs()  # 8x8 = 64 patch tokens
    with torch.no_grad():
        whole = model(x, torch.tensor([0.3, 0.8]), contexts, masks)
        monkeypatch.setattr(lidit, "SCORES_PER_CHUNK", 64 * 16)  # 16 query rows per chunk: 4 chunks
        calls = []
        model.interrupt_check = lambda: calls.append(1)
        chunked = model(x, torch.tensor([0.3, 0.8]), contexts, masks)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert len(calls) == model.config.depth * (1 + 4)  # before each block, and before each attention chunk


def test_a_raising_check_stops_the_forward_mid_attention(monkeypatch):
    model = tiny_model(depth=1)
    monkeypatch.setattr(lidit, "SCORES_PER_CHUNK", 64)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:  # inside the first block's self-attention
            raise Stop

    model.interrupt_check = check
    with pytest.raises(Stop):
        model(image(H=32, W=32), torch.tensor([0.5, 0.5]), *text_inputs())


def test_chunked_attention_keeps_the_causal_mask(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(32, 2)
    x, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        whole = attn(x, key_mask=mask, causal=True)
        monkeypatch.setattr(lidit, "SCORES_PER_CHUNK", 30)  # 3 query rows per chunk
        chunked = attn(x, key_mask=mask, causal=True, between_chunks=lambda: None)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_memory_estimate_grows_with_the_image_and_bounds_the_large_sizes():
    config = tiny_config(hidden_size=128, num_heads=4, mlp_ratio=4.0)
    small, large = forward_bytes(config, 2, 64, 64), forward_bytes(config, 2, 8192, 8192)
    assert small < 50 * 2 ** 20
    # 8192 px: 4.2 M patch tokens of 128 features, cond + uncond: tens of GB, refused on any ordinary machine.
    assert large > 4 * 2 ** 20 * 128 * 4 * 2 * 10
    assert forward_bytes(config, 1, 512, 512) * 2 == forward_bytes(config, 2, 512, 512)


# ---------------------------------------------------------------------------------------------------------------
# The trainer's attention kernel


@pytest.mark.parametrize("mask_kind", ["none", "keys", "causal"])
def test_scores_attention_equals_sdpa_with_gradients(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = None
    if mask_kind == "keys":
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        mask[0, ..., 4:] = False
    elif mask_kind == "causal":
        mask = torch.ones(7, 7, dtype=torch.bool).tril()
    ours = scores_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scores_attention_keeps_a_fully_masked_query_finite():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    out = scores_attention(q, k, v, torch.zeros(1, 1, 1, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_scores_attention_under_bf16_autocast_stays_close_to_fp32():
    q, k, v = (torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = scores_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = scores_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_model_on_the_scores_kernel_matches_the_sdpa_model(wake):
    model = wake(tiny_model())
    x, (contexts, masks) = image(), text_inputs()
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = model(x, t, contexts, masks)
        set_attention_kernel(model, scores_attention)
        ours = model(x, t, contexts, masks)
    assert all(m.kernel is scores_attention for m in model.modules() if isinstance(m, Attention))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

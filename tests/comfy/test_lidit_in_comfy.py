"""LI-DiT inside ComfyUI, in process: built on ComfyUI's `operations` and attention backend (what LI-DiT Loader
gives), and still the same model as the pure-PyTorch one of adapters/ (the trainer's and the evaluation's)."""
import os

import torch

import tiny_models  # noqa: F401  (sets up ComfyUI for the imports below)
import comfy.ops  # noqa: E402
from llm_diffusion.adapters.checkpoint import load_lidit  # noqa: E402
from llm_diffusion.adapters.lidit import Attention  # noqa: E402
from llm_diffusion.nodes.lidit_model import comfy_attention, load_lidit_patcher  # noqa: E402

DEFAULT_MODEL = os.path.join(tiny_models.ROOT, "models", "lidit", "lidit-shapes-smollm2.safetensors")


def test_lidit_runs_on_comfys_operations_and_attention_with_unchanged_results():
    patcher, _ = load_lidit_patcher(DEFAULT_MODEL, "fp32")
    net = patcher.model.diffusion_model
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm))]
    assert layers and all(isinstance(m, comfy.ops.CastWeightBiasOp) for m in layers)
    assert all(m.kernel is comfy_attention for m in net.modules() if isinstance(m, Attention))

    reference, _ = load_lidit(DEFAULT_MODEL)  # torch.nn layers, PyTorch SDPA
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.3, 0.8])
    context = torch.randn(2, 7, net.config.context_dims[0], generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        want = reference(x, t, [context], [mask])
        got = net(x, t, context=context, attention_mask=mask)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)  # fp32 noise of another attention kernel


def test_a_controlnet_on_lidit_is_refused_not_ignored():
    import pytest
    from llm_diffusion.adapters.lidit import LIDiTError
    net = load_lidit_patcher(DEFAULT_MODEL, "fp32")[0].model.diffusion_model
    x, context = torch.randn(1, 3, 32, 32), torch.randn(1, 4, net.config.context_dims[0])
    with pytest.raises(LIDiTError, match="take no ControlNet"):
        net(x, torch.tensor([0.5]), context=context, control={"input": [], "output": [], "middle": []})


def test_half_precision_weights_run_on_a_cpu_through_comfys_manual_cast():
    """fp16 or bf16 weights on a device that cannot compute in them (a CPU): stored in half precision, cast
    layer by layer to the compute dtype ComfyUI picks (unet_manual_cast), as ComfyUI's own models do."""
    full = load_lidit_patcher(DEFAULT_MODEL, "fp32")[0].model
    for choice, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        half = load_lidit_patcher(DEFAULT_MODEL, choice)[0].model
        assert next(half.diffusion_model.parameters()).dtype == dtype
        assert half.manual_cast_dtype == torch.float32
        g = torch.Generator().manual_seed(0)
        x, sigma = torch.randn(1, 3, 32, 32, generator=g), torch.tensor([0.6])
        context = torch.randn(1, 5, full.diffusion_model.config.context_dims[0], generator=g)
        with torch.no_grad():
            want = full.apply_model(x, sigma, c_crossattn=context)
            got = half.apply_model(x, sigma, c_crossattn=context)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # the weights' rounding, not a failure

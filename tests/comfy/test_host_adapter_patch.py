"""Apply LLM Diff Adapter on ComfyUI's own model classes, in process: shrunk random-weight instances of the UNet
(SD 1.5 and SDXL layouts), Flux and SD3's MMDiT, and our LI-DiT, sampled through ComfyUI's own sampling path
(comfy.sample.sample: conds, CFG batching, wrappers, patches) as KSampler does."""
from __future__ import annotations

import pytest
import torch

import tiny_models  # sets up ComfyUI for the imports below
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
from llm_diffusion.adapters.conditioning import pack_llm_tokens  # noqa: E402
from llm_diffusion.adapters.diff_adapter import HostAdapter  # noqa: E402
from llm_diffusion.adapters.lidit import LIDiTConfig  # noqa: E402
from llm_diffusion.nodes import diff_adapter_nodes as dan  # noqa: E402
from llm_diffusion.nodes.lidit_model import LIDiTModelConfig  # noqa: E402

S, D, C = 4, 24, 20  # the LLM's hidden states and width, the adapter's context size


def lidit_model(seed: int = 0):
    config = LIDiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=4, context_dims=(16,), refiner_depth=1)
    return tiny_models.patcher(tiny_models.randomize(dan.LIDiTNet(**config.to_dict()), seed), LIDiTModelConfig(config))


# family -> (MODEL factory, host context width, pooled width or None, latent channels)
FAMILIES = {
    "sd15": (tiny_models.sd15_model, 48, None, 4),
    "sdxl": (tiny_models.sdxl_model, 80, 1280, 4),
    "flux": (tiny_models.flux_model, 48, 32, 16),
    "mmdit": (tiny_models.mmdit_model, tiny_models.LLM_WIDTH, tiny_models.MMDIT_POOLED, 16),
    "lidit": (lidit_model, 16, None, 3),
}


def host_for(model, seed: int = 0, open_gates: bool = False) -> tuple[HostAdapter, dict]:
    """A random adapter for this MODEL; open_gates: the LLM branches open and, where the host branch has a gate of
    its own (UNet, LI-DiT), that gate away from 1 as training leaves it."""
    family, sites = dan.host_family(model.model.diffusion_model)
    torch.manual_seed(seed)
    host = HostAdapter(D, S, C, sites, "decoupled" if family in ("unet", "lidit") else "gated")
    if open_gates:
        tiny_models.open_gates(host)
    return host, {"family": family, "llm": "tiny-llm"}


def conditioning(name: str, prompt_seed: int, llm_tokens: int | None = 6):
    """[[context, extras]] as a text encoder gives it, with LLM hidden states attached (LLM Conditioning Attach)."""
    _, width, pooled, _ = FAMILIES[name]
    g = torch.Generator().manual_seed(prompt_seed)
    extras = {}
    if pooled:
        extras["pooled_output"] = torch.randn(1, pooled, generator=g)
    if name == "lidit":
        extras["attention_mask"] = torch.ones(1, 5, dtype=torch.long)
    if llm_tokens is not None:
        hidden = torch.randn(1, llm_tokens, S * D, generator=g)  # hidden states, not contributions
        extras["model_conds"] = {dan.COND_KEY: dan.CONDLLMTokens(pack_llm_tokens(hidden, None, False))}
    return [[torch.randn(1, 5, width, generator=g), extras]]


def sample(model, name: str, llm_tokens=(6, 3), steps: int = 3, cfg: float = 3.0) -> torch.Tensor:
    """Euler with CFG; cond and uncond carry LLM encodings of different lengths (ComfyUI batches them)."""
    channels = FAMILIES[name][3]
    latent = torch.zeros(1, channels, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", conditioning(name, 0, llm_tokens[0]),
                               conditioning(name, 1, llm_tokens[1]), latent, disable_pbar=True, seed=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param][0]()


def test_closed_gates_give_the_unpatched_output_exactly(family):
    name, model = family
    before = sample(model, name)
    patched = dan.apply_host_adapter(model, *host_for(model), "fresh", 1.0)
    assert torch.equal(sample(patched, name), before)
    assert torch.equal(sample(model, name), before)  # the input MODEL is not touched


def test_open_gates_change_the_output_and_strength_0_is_the_base(family):
    name, model = family
    before = sample(model, name)
    host, info = host_for(model, open_gates=True)
    if host.kind == "decoupled":
        assert all(b.host_gate_b.item() != 0 for b in host.branches), "the host branch's gate must be open too"
    after = sample(dan.apply_host_adapter(model, host, info, "open", 1.0), name)
    assert torch.isfinite(after).all()
    assert (after - before).abs().mean() > 1e-4
    assert torch.equal(sample(dan.apply_host_adapter(model, host, info, "open", 0.0), name), before)
    # another prompt for the LLM branch gives another image: the encoding reaches the patch
    other = sample(dan.apply_host_adapter(model, host, info, "open", 1.0), name, llm_tokens=(4, 3))
    assert (other - after).abs().mean() > 1e-5


def test_a_conditioning_without_an_llm_encoding_is_the_base(family):
    name, model = family
    before = sample(model, name, llm_tokens=(None, None))
    host, info = host_for(model, open_gates=True)
    for strength in (1.0, 0.5):
        assert torch.equal(sample(dan.apply_host_adapter(model, host, info, "open", strength), name,
                                  llm_tokens=(None, None)), before)


@pytest.mark.parametrize("llm_tokens, side", [((6, None), "the positive conditioning carries one, the negative does not"),
                                              ((None, 3), "the negative conditioning carries one, the positive does not")])
def test_an_llm_encoding_on_one_side_of_cfg_only_is_refused_with_the_fix(family, llm_tokens, side):
    """With the encoding on one side only, the adapter changes one side of CFG and guidance amplifies the change."""
    name, model = family
    patched = dan.apply_host_adapter(model, *host_for(model, open_gates=True), "open", 1.0)
    with pytest.raises(dan.AdapterError, match=f"{side}.*Attach an LLM encoding to every conditioning that reaches "
                                               r"the sampler \(positive and negative.*an empty prompt is a valid one"):
        sample(patched, name, llm_tokens=llm_tokens)
    # without CFG (scale 1) ComfyUI never runs the negative: nothing to compare, nothing refused
    assert torch.isfinite(sample(patched, name, llm_tokens=llm_tokens, cfg=1.0)).all()


def test_a_mix_within_one_side_or_across_other_guiders_sides_is_named_as_it_is():
    """Combined conditioning (several entries on one side) and guiders other than CFGGuider (three sides, in their
    own order) get a message that claims no role it cannot know."""
    entry = lambda llm: {"model_conds": {dan.COND_KEY: None} if llm else {}}  # noqa: E731
    with pytest.raises(dan.AdapterError, match="some entries of the positive conditioning carry one and some do not"):
        dan.check_llm_encodings([[entry(True), entry(False)], [entry(True)]])
    with pytest.raises(dan.AdapterError, match="#1 of the guider's 3, #3 of the guider's 3 conditioning carries one, "
                                               "#2 of the guider's 3 does not"):
        dan.check_llm_encodings([[entry(True)], [entry(False)], [entry(True)]])
    dan.check_llm_encodings([[entry(True), entry(True)], None])    # CFG 1: the negative is not computed
    dan.check_llm_encodings([[entry(False)], [entry(False)], []])  # no encoding anywhere: the base model


# ComfyUI 0.3.75's Flux blocks update their inputs in place (`img += ...`, `x += ...`), so no gradient flows
# through a Flux model at all, with or without the adapter: Flux adapters are applied, not trained, in ComfyUI.
TRAINABLE = [name for name in FAMILIES if name != "flux"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_gradients_reach_only_the_adapter_and_the_new_path(name):
    model = FAMILIES[name][0]()
    host, info = host_for(model, open_gates=True)
    patched = dan.apply_host_adapter(model, host, info, "open", 1.0)
    base = patched.model
    base.requires_grad_(False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    channels = FAMILIES[name][3]
    cond = conditioning(name, 0)[0]
    kwargs = {dan.COND_KEY: cond[1]["model_conds"][dan.COND_KEY].cond}
    if "pooled_output" in cond[1]:
        extra = base.extra_conds(pooled_output=cond[1]["pooled_output"], width=128, height=128, device="cpu",
                                 cross_attn=cond[0])
        kwargs.update({k: v.cond for k, v in extra.items() if k != "c_crossattn"})
    if name == "lidit":
        kwargs["attention_mask"] = cond[1]["attention_mask"]
    x = torch.randn(1, channels, 16, 16)
    # what sampling hands the model (sampler_helpers.prepare_model_patcher merges the MODEL's wrappers in)
    options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers}
    with torch.enable_grad():
        out = base.apply_model(x, torch.tensor([0.5 if name in ("flux", "mmdit", "lidit") else 500.0]),
                               c_crossattn=cond[0], transformer_options=options, **kwargs)
        out.pow(2).mean().backward()
    assert all(p.grad is None for p in base.parameters())
    missing = [n for n, p in host.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_the_patch_survives_unloading_and_reloading(family):
    name, model = family
    host, info = host_for(model, open_gates=True)
    patched = dan.apply_host_adapter(model, host, info, "open", 1.0)
    first = sample(patched, name)
    mm.unload_all_models()
    mm.load_models_gpu([patched])
    mm.unload_all_models()
    assert torch.equal(sample(patched, name), first)
    assert torch.equal(sample(model.clone(), name), sample(model, name))


def test_stacks_with_a_weight_patch_and_a_previous_replace_patch():
    model = tiny_models.sd15_model()
    lora = model.clone()  # a LoRA's effect: a weight patch on one layer
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"
    lora.add_patches({key: (torch.randn(lora.model.state_dict()[key].shape) * 0.05,)}, 1.0)
    assert not torch.equal(sample(lora, "sd15"), sample(model, "sd15"))
    host, info = host_for(model)
    assert torch.equal(sample(dan.apply_host_adapter(lora, host, info, "fresh", 1.0), "sd15"), sample(lora, "sd15"))

    halved = model.clone()  # an attn2 replace patch already there (as IP-Adapter or attention couple add)
    calls = []

    def half_attention(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return 0.5 * comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])
    for (key, _) in dan.unet_sites(model.model.diffusion_model):
        halved.set_model_attn2_replace(half_attention, *key[:2])  # a whole-block key, as most packs set them
    reference = sample(halved, "sd15")
    calls.clear()
    assert torch.equal(sample(dan.apply_host_adapter(halved, host, info, "fresh", 1.0), "sd15"), reference)
    assert calls, "the previous replace patch was not called"


def test_a_second_adapter_on_the_same_model_is_refused():
    model = tiny_models.sd15_model()
    patched = dan.apply_host_adapter(model, *host_for(model), "first", 1.0)
    with pytest.raises(dan.AdapterError, match="has an LLM Diff Adapter applied already"):
        dan.apply_host_adapter(patched, *host_for(model, seed=1), "second", 1.0)


def test_an_adapter_for_another_family_or_model_is_refused_with_the_fix():
    sd15, sdxl, flux = tiny_models.sd15_model(), tiny_models.sdxl_model(), tiny_models.flux_model()
    host, info = host_for(sd15)
    with pytest.raises(dan.AdapterError, match="trained for a unet model, but this MODEL is flux"):
        dan.apply_host_adapter(flux, host, info, "sd15-adapter", 1.0)
    with pytest.raises(dan.AdapterError, match="7 cross-attention sites .* but this one has 8 .*SD 1.5 vs SDXL"):
        dan.apply_host_adapter(sdxl, host, info, "sd15-adapter", 1.0)
    other = comfy.model_patcher.ModelPatcher(torch.nn.Module(), load_device="cpu", offload_device="cpu")
    other.model.diffusion_model = torch.nn.Linear(2, 2)
    with pytest.raises(dan.AdapterError, match="supports LI-DiT, ComfyUI's UNet .* this MODEL is a Linear"):
        dan.apply_host_adapter(other, host, info, "sd15-adapter", 1.0)


def test_an_encoding_from_another_llm_is_refused_at_sampling_with_the_fix():
    model = tiny_models.sd15_model()
    host, info = host_for(model)
    patched = dan.apply_host_adapter(model, host, {**info, "llm": "SmolLM2"}, "sd15-adapter", 1.0)
    latent = torch.zeros(1, 4, 16, 16)
    wrong = conditioning("sd15", 0, llm_tokens=None)
    wrong[0][1]["model_conds"] = {dan.COND_KEY: dan.CONDLLMTokens(torch.ones(1, 3, S * D + 9))}
    with pytest.raises(dan.AdapterError, match=f"has {S * D + 7} features per token.*trained on SmolLM2 "
                                               f"\\({S} hidden states of size {D}"):
        comfy.sample.sample(patched, latent, 1, 1.0, "euler", "simple", wrong, wrong, latent, disable_pbar=True)
    contributions = conditioning("sd15", 0)
    contributions[0][1]["model_conds"][dan.COND_KEY] = dan.CONDLLMTokens(
        pack_llm_tokens(torch.randn(1, 6, S * D), None, True))  # block contributions, not states
    with pytest.raises(dan.AdapterError, match="trained on each block's output: turn block_contributions off"):
        comfy.sample.sample(patched, latent, 1, 1.0, "euler", "simple", contributions, contributions, latent,
                            disable_pbar=True)


def llm_tokens(T: int, contributions: bool, seed: int = 0) -> torch.Tensor:
    """LLM tokens as LLM Conditioning Attach puts them in model_conds."""
    return pack_llm_tokens(torch.randn(1, T, S * D, generator=torch.Generator().manual_seed(seed)), None, contributions)


def test_the_block_contributions_setting_is_checked_per_sample():
    model = tiny_models.sd15_model()
    host, info = host_for(model)
    for trained_on in (True, False):
        batch = [llm_tokens(6, trained_on), llm_tokens(3, trained_on, 1)]
        tokens = dan.CONDLLMTokens(batch[0]).concat([dan.CONDLLMTokens(batch[1])])  # cond and uncond, padded
        context, mask = dan.fuse_tokens(host, tokens, "adapter", "tiny-llm", trained_on)
        assert context.shape == (2, 6, C) and mask.sum(1).tolist() == [6, 3]
        mixed = dan.CONDLLMTokens(batch[0]).concat([dan.CONDLLMTokens(llm_tokens(3, not trained_on, 1))])
        with pytest.raises(dan.AdapterError, match=f"trained on each block's "
                                                   f"{'contribution' if trained_on else 'output'}.*1 of the 2"):
            dan.fuse_tokens(host, mixed, "adapter", "tiny-llm", trained_on)

    # through sampling: the positive encoded with block contributions, the negative without (one batch under CFG)
    patched = dan.apply_host_adapter(model, host, {**info, "encoder": '{"contributions": true}'}, "adapter", 1.0)
    positive, negative = conditioning("sd15", 0), conditioning("sd15", 1)
    positive[0][1]["model_conds"][dan.COND_KEY] = dan.CONDLLMTokens(llm_tokens(6, True))
    negative[0][1]["model_conds"][dan.COND_KEY] = dan.CONDLLMTokens(llm_tokens(3, False))
    latent = torch.zeros(1, 4, 16, 16)
    with pytest.raises(dan.AdapterError, match="trained on each block's contribution: turn block_contributions on"):
        comfy.sample.sample(patched, latent, 1, 3.0, "euler", "simple", positive, negative, latent, disable_pbar=True)


@pytest.mark.parametrize("masks, calls_per_step", [(False, 1), (True, 2)])
def test_lidit_cond_and_uncond_share_a_forward_unless_masks_differ(masks, calls_per_step):
    """LLM Prompt Encode attaches no all-ones mask (one prompt is never padded): ComfyUI then batches cond and uncond
    of different lengths into one forward (repeating the shorter tokens, which changes no attention); masks of
    different shapes cannot be batched and cost a second forward."""
    model = lidit_model().clone()
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(args[0].shape[0])
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "count", count)
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 6, 16, generator=g), {}]]
    uncond = [[torch.randn(1, 3, 16, generator=g), {}]]
    if masks:
        cond[0][1]["attention_mask"], uncond[0][1]["attention_mask"] = torch.ones(1, 6), torch.ones(1, 3)
    latent = torch.zeros(1, 3, 16, 16)
    comfy.sample.sample(model, torch.randn(latent.shape, generator=g), 3, 3.0, "euler", "simple", cond, uncond,
                        latent, disable_pbar=True)
    assert len(calls) == 3 * calls_per_step

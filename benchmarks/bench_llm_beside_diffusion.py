"""A 1B-parameter GGUF LLM beside a 1B-parameter diffusion model under ComfyUI's memory manager.

Run from the repository root (one call on a GPU machine, a few minutes on an H100):

    .venv/bin/python -m benchmarks.bench_llm_beside_diffusion                      # CUDA when there is one
    .venv/bin/python -m benchmarks.bench_llm_beside_diffusion --device cpu --size tiny --quick   # the tested path

The LLM. No 1B LLM in Q4 ships, so one is built: a llama-architecture GGUF file with the shipped tokenizer (every
tokenizer.* key of SmolLM2-135M-Instruct's GGUF: its vocabulary, merges and chat template) and random weights
(seed fixed). `--size 1b`: 1.07B parameters (TinyLlama's shape: width 2048, 22 blocks, FFN 5632, 32 heads, 4 KV
heads, here with SmolLM2's 49152-token vocabulary and tied embeddings); `--size tiny`: a few MB. Every matrix is
Q4_0, written as random valid blocks (a random fp16 scale and random nibbles: what quantizing random weights gives,
without quantizing a billion floats in numpy); norms F32. It is written to a temporary folder, or to --llm-out
(reused when that file exists).

The diffusion model. The pack's LI-DiT at the paper's LI-DiT-1B size (adapters.lidit.PRESETS: width 1152, 28
blocks, 16-channel latents) with context_dims = the LLM's width, random weights, saved as an LI-DiT file (or
--lidit-out, reused when it exists): it is the model class this pack's workflows put beside the LLM, and it takes
the LLM's hidden states directly, so the run is the shipped workflow's graph at 1B size. (ComfyUI's SDXL UNet would
need CLIP's context and pooled vectors, which an LLM encoding does not give.) `--size tiny`: a small LI-DiT.

Each mode runs what a workflow runs, by calling the pack's nodes: LLM Loader (.execute, the GGUF file's weights
stay in their blocks) and LI-DiT Loader, then LLM Prompt Encode (instruction li-dit, chat template, layers -3) of
the prompt and of the empty negative, then LI-DiT Sampler (euler, simple, cfg 3) on an empty 16-channel latent;
then a second prompt is encoded and sampled, as the next queued prompt would be (the LLM comes back after the
diffusion model took the room). Between modes every model is unloaded and ComfyUI's settings are restored.

  (a) all resident  LLM Loader device 'gpu' (load_models_gpu(force_full_load=True)), ComfyUI's default budget.
  (b) partial load  LLM Loader device 'auto' under a VRAM budget that holds the diffusion model and half the LLM
                    (--budget-gib to change it): ComfyUI's reserved VRAM (mm.EXTRA_RESERVED_VRAM, what
                    --reserve-vram sets) is raised until only that budget is left to weights beyond ComfyUI's own
                    inference reserve. load_models_gpu then loads what fits, pushes the LLM (partly) out when the
                    diffusion model loads, and casts the offloaded layers to the GPU as they run.
  (c) --lowvram     mm.vram_state = VRAMState.LOW_VRAM (what ComfyUI 0.3.75 sets for --lowvram), under the same
                    budget: text_encoder_device() is then the CPU, so the LLM runs there (as ComfyUI's own text
                    encoders do), and the diffusion model gets the budget.

Columns: seconds of each node call (CUDA synchronised); how much of each model ComfyUI holds on its load device
(ModelPatcher.loaded_size of model_size); the peak of torch.cuda.max_memory_allocated over the mode (reset after the
previous mode was unloaded); the largest absolute difference of the conditioning and of the first sampled latent
from mode (a). On the CPU ComfyUI never loads a model partially (its vram state is DISABLED there): the three rows
run the same loads, the budget reads '-', and only the times differ; the rows differ on CUDA.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.path.join(ROOT, ".comfyui")
SHIPPED_LLM = os.path.join(COMFY, "models", "LLM", "SmolLM2-135M-Instruct.Q4_1.gguf")

LLM_SIZES = {  # llama shapes; matrices are Q4_0, so widths are multiples of its 32-value blocks
    "1b": dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4),
    "tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2),
}
LIDIT_TINY = dict(hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=2, in_channels=16,
                  refiner_depth=1)
IMAGE_SIZES = {"1b": 1024, "tiny": 64}  # pixels; the latent is 8x smaller, as for a 16-channel (Flux/SD3) VAE
PROMPTS = ("a red triangle above a white circle", "two blue squares to the left of a green disc")
WEIGHT_STD = 0.02
MODES = {"a": "(a) all resident", "b": "(b) partial load", "c": "(c) --lowvram"}
MiB, GiB = 2 ** 20, 2 ** 30


# ---------------------------------------------------------------------------------------------------------------
# The LLM file

def q4_0_blocks(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """[rows, cols / 32 * 18] uint8: Q4_0 blocks (fp16 scale d, then 16 bytes of nibbles q; value (q - 8) * d) of
    random weights with standard deviation about `std` ((q - 8) has standard deviation 4.64 for uniform q)."""
    blocks = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, size=(rows, cols // 32)).astype(np.float16) * np.float16(std / 4.64)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
    return blocks.reshape(rows, -1)


def llm_tensors(shape: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> (rows, values per row) of a llama decoder with tied embeddings (no output.weight)."""
    h, f, kv = shape["hidden"], shape["intermediate"], shape["kv_heads"] * (shape["hidden"] // shape["heads"])
    names = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    for i in range(shape["layers"]):
        names.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.attn_q.weight": (h, h),
                      f"blk.{i}.attn_k.weight": (kv, h), f"blk.{i}.attn_v.weight": (kv, h),
                      f"blk.{i}.attn_output.weight": (h, h), f"blk.{i}.ffn_norm.weight": (h,),
                      f"blk.{i}.ffn_gate.weight": (f, h), f"blk.{i}.ffn_up.weight": (f, h),
                      f"blk.{i}.ffn_down.weight": (h, f)})
    return names


def add_tokenizer(writer, metadata: dict) -> None:
    """Every tokenizer.* key of the shipped GGUF, in GGUF's types for them (ids uint32, flags bool)."""
    for key, value in metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, np.ndarray):  # token types (int32), scores (float32): Python items give those types
            writer.add_array(key, value.tolist())
        else:  # a list of strings as bytes: tokens, merges
            writer.add_array(key, value)


def build_llm(path: str, size: str, seed: int) -> None:
    import gguf
    from llm_diffusion.adapters import gguf_weights
    from llm_diffusion.adapters.checkpoint import written_atomically

    shipped = gguf_weights.read_gguf(SHIPPED_LLM).metadata
    with written_atomically(path) as tmp:
        write_llm(gguf.GGUFWriter(tmp, "llama"), shipped, size, seed)


def write_llm(writer, shipped: dict, size: str, seed: int) -> None:
    import gguf
    shape = LLM_SIZES[size]
    vocab = len(shipped["tokenizer.ggml.tokens"])
    writer.add_name(f"random llama {size} (benchmark)")
    writer.add_context_length(2048)
    writer.add_embedding_length(shape["hidden"])
    writer.add_block_count(shape["layers"])
    writer.add_feed_forward_length(shape["intermediate"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_rope_dimension_count(shape["hidden"] // shape["heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, shipped)
    rng = np.random.default_rng(seed)
    for name, dims in llm_tensors(shape, vocab).items():
        if len(dims) == 1:
            writer.add_tensor(name, np.ones(dims, dtype=np.float32))
        else:
            writer.add_tensor(name, q4_0_blocks(rng, *dims, WEIGHT_STD), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lidit_config(size: str, llm_hidden: int):
    from llm_diffusion.adapters.lidit import PRESETS, LIDiTConfig
    return LIDiTConfig(**(PRESETS["LI-DiT-1B"] if size == "1b" else LIDIT_TINY), context_dims=(llm_hidden,))


def build_lidit(path: str, config, llm_name: str, seed: int) -> None:
    """PyTorch's initialisation, and the adaLN-Zero layers that start at zero made small and random: a model whose
    gates are all zero would give the same latent whatever the conditioning, and compare nothing."""
    from llm_diffusion.adapters.checkpoint import save_lidit
    from llm_diffusion.adapters.lidit import LIDiT

    torch.manual_seed(seed)
    net = LIDiT(config)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, WEIGHT_STD)
    save_lidit(path, net, [{"llm": llm_name}])


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI in process

def import_comfy(device: str):
    """ComfyUI and the pack (as the package `llm_diffusion`) in this process, on `device`."""
    from training.comfyui import import_comfyui
    import_comfyui(COMFY, cpu=device == "cpu")
    import comfy.model_management as mm
    if mm.get_torch_device().type != device:
        raise SystemExit(f"--device {device}, but ComfyUI was already set up for {mm.get_torch_device()}.")
    return mm


def register_folders(llm_path: str, lidit_path: str) -> tuple[str, str]:
    """The LLM Loader's and LI-DiT Loader's names for the two files, their folders added to ComfyUI's lists."""
    import folder_paths
    from llm_diffusion.nodes import model_folders

    model_folders.register()
    folder_paths.add_model_folder_path("LLM", os.path.dirname(llm_path))
    folder_paths.add_model_folder_path("lidit", os.path.dirname(lidit_path))
    llm_name = next((n for n, p in model_folders.llm_entries().items() if os.path.samefile(p, llm_path)), None)
    lidit_name = os.path.basename(lidit_path)
    if llm_name is None or not os.path.samefile(model_folders.lidit_path(lidit_name), lidit_path):
        raise SystemExit("ComfyUI's model folders hold another file of the same name as the LLM or the LI-DiT; pass "
                         "--llm-out / --lidit-out with other names.")
    return llm_name, lidit_name


def timed_node(cuda: bool, node, *inputs) -> tuple[tuple, float]:
    """(the node's outputs, seconds), as ComfyUI runs it: node.execute with the inputs in its schema's order."""
    start = time.perf_counter()
    outputs = node.execute(*inputs).result
    if cuda:
        torch.cuda.synchronize()
    return outputs, time.perf_counter() - start


def run_mode(mode: str, mm, names: tuple[str, str], opts) -> dict:
    from llm_diffusion.nodes.lidit_nodes import LIDiTLoader, LIDiTSampler
    from llm_diffusion.nodes.llm_nodes import LLMLoader, LLMPromptEncode

    cuda = opts.device == "cuda"
    saved = mm.vram_state, mm.EXTRA_RESERVED_VRAM
    if mode == "c":
        mm.vram_state = mm.VRAMState.LOW_VRAM
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = {"budget": None}
    try:
        # ComfyUI sets these when it starts, so they come before the loaders, which read them
        if mode != "a" and cuda:
            out["budget"] = opts.budget
            inference = mm.minimum_inference_memory() - mm.extra_reserved_memory()
            mm.EXTRA_RESERVED_VRAM = max(0, int(mm.get_free_memory(mm.get_torch_device()) - inference - opts.budget))
        (llm,), t_llm = timed_node(cuda, LLMLoader, names[0], opts.llm_dtype, "gpu" if mode == "a" else "auto")
        (model,), t_model = timed_node(cuda, LIDiTLoader, names[1], "auto")
        out.update(load=t_llm + t_model, llm_device=str(llm.patcher.load_device),
                   llm_dtype=str(llm.hf_model.dtype).replace("torch.", ""), llm_size=llm.patcher.model_size(),
                   model_size=model.model_size(), encodings=[], latents=[], encode=[], sample=[])
        side = opts.image // 8
        latent = {"samples": torch.zeros(1, model.model.diffusion_model.config.in_channels, side, side)}

        for round_, prompt in enumerate(PROMPTS[:opts.rounds]):
            # LI-DiT's instruction and layer (the third last), in the chat template; the negative is empty
            (positive,), t_pos = timed_node(cuda, LLMPromptEncode, llm, prompt, "li-dit", "", True, "-3", 256)
            (negative,), t_neg = timed_node(cuda, LLMPromptEncode, llm, "", "li-dit", "", True, "-3", 256)
            if round_ == 0:
                out["llm_loaded_after_encode"] = llm.patcher.loaded_size()
            (sampled,), t_sample = timed_node(cuda, LIDiTSampler, model, positive, negative, latent, opts.seed,
                                              opts.steps, 3.0, "euler", "simple", 1.0)
            if round_ == 0:
                out.update(llm_loaded_after_sample=llm.patcher.loaded_size(), model_loaded=model.loaded_size())
            out["encode"].append(t_pos + t_neg)
            out["sample"].append(t_sample)
            out["encodings"].append(positive[0][0])
            out["latents"].append(sampled["samples"].float().cpu())
        if cuda:
            out["peak"] = torch.cuda.max_memory_allocated()
    finally:
        for device in {mm.get_torch_device(), torch.device("cpu")}:  # (c)'s LLM is loaded onto the CPU
            mm.free_memory(1e30, device)
        mm.vram_state, mm.EXTRA_RESERVED_VRAM = saved
        llm = model = None  # the last references, so that the collection below frees their memory now
        gc.collect()
        mm.cleanup_models_gc()
        mm.soft_empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(LLM_SIZES), default="1b", help="LLM and LI-DiT size")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 10; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="2 steps and half the image size")
    p.add_argument("--image", type=int, default=None, help="image side in pixels (default 1024 for 1b, 64 tiny)")
    p.add_argument("--rounds", type=int, choices=[1, 2], default=2, help="prompts encoded and sampled per mode")
    p.add_argument("--llm-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="LLM Loader's dtype (auto: bf16/fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="VRAM for weights in (b) and (c) (default: the diffusion model and half the LLM)")
    p.add_argument("--modes", default="abc", help="which of the modes a, b, c to run")
    p.add_argument("--llm-out", default=None, help="the LLM's .gguf path (reused when it exists)")
    p.add_argument("--lidit-out", default=None, help="the LI-DiT's .safetensors path (reused when it exists)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 10)
    args.image = args.image or IMAGE_SIZES[args.size] // (2 if args.quick else 1)
    if args.image % 16:
        p.error("--image must be a multiple of 16 (8x VAE downscale, then patches of 2)")
    if not set(args.modes) <= set(MODES) or "a" not in args.modes:
        p.error("--modes takes a, b, c, and a (the reference of the differences)")
    return args


def mib(n: float) -> str:
    return f"{n / MiB:.0f}"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def largest_diff(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> str:
    """The largest absolute difference over pairs of tensors, and its share of the reference's largest value."""
    d, ref = max((((x.float() - r.float()).abs().max().item(), r) for x, r in zip(xs, refs)), key=lambda p: p[0])
    return "0" if d == 0 else f"{d:.2g} ({d / ref.float().abs().max().item():.1g} of max)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    mm = import_comfy(args.device)
    from llm_diffusion.adapters import gguf_weights

    work = tempfile.mkdtemp(prefix="bench_llm_beside_diffusion_")
    try:
        llm_path = args.llm_out or os.path.join(work, f"bench-llama-{args.size}-q4_0.gguf")
        lidit_path = args.lidit_out or os.path.join(work, f"bench-lidit-{args.size}.safetensors")
        for path in (llm_path, lidit_path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        built = []
        start = time.perf_counter()
        if not os.path.exists(llm_path):
            build_llm(llm_path, args.size, args.seed)
            built.append(f"LLM {time.perf_counter() - start:.1f} s")
        llm_file = gguf_weights.read_gguf(llm_path)
        hidden = int(llm_file.metadata["llama.embedding_length"])
        start = time.perf_counter()
        if not os.path.exists(lidit_path):
            build_lidit(lidit_path, lidit_config(args.size, hidden), os.path.basename(llm_path), args.seed)
            built.append(f"LI-DiT {time.perf_counter() - start:.1f} s")
        names = register_folders(llm_path, lidit_path)

        results = {}
        for mode in sorted(args.modes):  # (a) first: the reference, and the sizes that the budget is made of
            if mode != "a" and args.device == "cuda":
                llm_size, model_size = results["a"]["llm_size"], results["a"]["model_size"]
                args.budget = args.budget_gib * GiB if args.budget_gib else model_size + llm_size / 2
            print(f"running {MODES[mode]}", file=sys.stderr)
            results[mode] = run_mode(mode, mm, names, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref = results["a"]
    params = sum(int(np.prod(t.shape)) for t in llm_file.tensors.values())
    quantized = sum(t.nbytes for t in llm_file.tensors.values() if t.type != gguf_weights.Q.F32)
    with torch.device("meta"):
        from llm_diffusion.adapters.lidit import LIDiT
        lidit_params = sum(p.numel() for p in LIDiT(lidit_config(args.size, hidden)).parameters())
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n### LLM beside a diffusion model through ComfyUI's memory manager ({device}, --size {args.size})\n")
    print(f"LLM: random llama, {count(params)} parameters, Q4_0 blocks {quantized / MiB:.0f} MiB "
          f"({os.path.getsize(llm_path) / MiB:.0f} MiB file), shipped SmolLM2 tokenizer. LI-DiT: "
          f"{count(lidit_params)} parameters, {ref['model_size'] / MiB:.0f} MiB in ComfyUI. {args.image}x"
          f"{args.image} px, {args.steps} euler steps, cfg 3; {args.rounds} prompt(s) per mode. "
          + (f"Built: {', '.join(built)}." if built else "Files reused.") + "\n")
    print("| mode | VRAM budget for weights, GiB | LLM runs on | LLM dtype | load s | encode s (per prompt) "
          "| sample s (per prompt) | LLM loaded after encode / after sampling, MiB | LI-DiT loaded, MiB "
          "| peak VRAM, GiB | max abs diff of the encodings vs (a) | max abs diff of the latent vs (a) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        budget = "-" if r["budget"] is None else f"{r['budget'] / GiB:.2f}"
        peak = f"{r['peak'] / GiB:.2f}" if "peak" in r else "-"
        print(f"| {MODES[mode]} | {budget} | {r['llm_device']} | {r['llm_dtype']} | {r['load']:.1f} | "
              f"{' / '.join(f'{t:.2f}' for t in r['encode'])} | {' / '.join(f'{t:.2f}' for t in r['sample'])} | "
              f"{mib(r['llm_loaded_after_encode'])} / {mib(r['llm_loaded_after_sample'])} of {mib(r['llm_size'])} | "
              f"{mib(r['model_loaded'])} of {mib(r['model_size'])} | {peak} | "
              f"{largest_diff(r['encodings'], ref['encodings'])} | "
              f"{largest_diff(r['latents'][:1], ref['latents'][:1])} |")
    if args.device == "cpu":
        print("\nOn the CPU ComfyUI loads no model partially (its vram state is DISABLED): the modes differ on CUDA.")
    return results


if __name__ == "__main__":
    main()

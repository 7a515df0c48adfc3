"""Prompt-encoding benchmark: what the pack's LLM path costs over a plain transformers forward.

Run from the repository root (CPU; a few minutes):

    .venv/bin/python -m benchmarks.bench_encode                       # SmolLM2 from .comfyui/models/LLM
    .venv/bin/python -m benchmarks.bench_encode --quick --threads 1   # 2 timed repeats, while other jobs run
    .venv/bin/python -m benchmarks.bench_encode --device cuda         # + the offloaded row

Variants, all on the same LLM weights and the same prompt(s):

  (a) plain      `model.get_decoder()(ids, output_hidden_states=True)` on the very token sequence that (b) builds
                 (instruction + chat-template prefix + prompt): the floor for one forward keeping every state.
  (b) encode     adapters.llm_encoder.encode_prompts(layers='all') without a prefix cache (tokenising, prefix and
                 prompt in one forward, cutting the prompt tokens out of all hidden states).
  (c) +adapter   (b) followed by a randomly initialised LLMDiffAdapter (context 128) through
                 adapters.conditioning.hidden_states_to_context: the node's full output (the adapter runs on
                 the CPU on the float32 states, as in the node).
  (d) offload    CUDA only: weights in CPU memory, `model.to(cuda)` before and `.to(cpu)` after every call (what
                 a memory manager that swaps the whole LLM does).
  (e) cached     (b) with a PrefixCache, as LLM Prompt Encode runs it: the instruction and template's keys and values
                 were computed in the warm-up, so each call runs only the prompt's tokens after them.
  (f) dense      (b) on the same GGUF LLM with every weight dequantized at load (adapters.gguf_weights.
                 dequantize_layers: what a load that dequantizes the whole file makes), against (b) whose GGUF
                 weights stay quantized and are dequantized layer by layer in each forward. A Hugging Face folder
                 has no GGUF layers: there (f) is (b).

Columns: median wall-clock ms of --repeats calls after --warmup calls; the ratio to (a); memory; and the largest
absolute difference of the returned prompt-token hidden states from (a) (0 = the same arithmetic).

Memory. Each variant runs in a fresh process (multiprocessing 'spawn'), so one variant's allocations cannot
hide another's. CPU: growth of resource.getrusage(RUSAGE_SELF).ru_maxrss over the variant's warm-up and repeats;
the process resets its high-water mark after loading the LLM (writing 5 to /proc/self/clear_refs) because
loading peaks far above any forward; where that is not possible the column is marked '*' (then it usually reads
0: the load peak hides the forward). CUDA: torch.cuda.max_memory_allocated during the variant, and its growth
over what was allocated before the first call (the resident weights).

Every variant process loads the LLM with load_llm, as LLM Loader does (a GGUF file's weights stay quantized).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import statistics
import sys
import time

import torch

from adapters import gguf_weights, llm_encoder
from adapters.conditioning import hidden_states_to_context
from adapters.diff_adapter import LLMDiffAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_LLM = os.path.join(ROOT, ".comfyui", "models", "LLM", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_PROMPT = "a blue square in the top right corner"
CONTEXT_DIM = 128
VARIANTS = {
    "plain": "(a) plain decoder forward",
    "encode": "(b) encode_prompts layers='all'",
    "adapter": "(c) (b) + LLMDiffAdapter",
    "offload": "(d) (b) offloaded (.to per call)",
    "cached": "(e) (b) with the prefix cached",
    "dense": "(f) (b) dequantized at load",
}


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(cfg: dict) -> dict:
    """One variant in a fresh process: load, reset the memory high-water marks, warm up, time, measure."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    variant = cfg["variant"]
    model, tokenizer = llm_encoder.load_llm(cfg["llm"], dtype)
    if variant == "dense":
        gguf_weights.dequantize_layers(model)
    weights_on_gpu = device.type == "cuda" and variant in ("plain", "encode", "cached", "adapter", "dense")
    if weights_on_gpu:
        model.to(device)
    decoder = llm_encoder.decoder(model)
    prompts = cfg["prompts"]
    instruction = llm_encoder.INSTRUCTION_PRESETS[cfg["instruction"]]
    options = dict(instruction=instruction, use_chat_template=True, layers="all", max_tokens=cfg["max_tokens"])
    if variant == "cached":
        options["prefix_cache"] = llm_encoder.PrefixCache()

    ids, mask, start, n0 = plain_inputs(tokenizer, prompts, instruction, cfg["max_tokens"], device)
    padded, width = bool((mask == 0).any()), ids.shape[1]

    adapter = None
    if variant == "adapter":
        torch.manual_seed(0)
        # On the CPU, as LLM Prompt Encode runs it (the adapter is never moved; encodings come back to the CPU).
        adapter = LLMDiffAdapter(llm_encoder.hidden_size(model), llm_encoder.num_hidden_states(model), CONTEXT_DIM)
        adapter.eval().requires_grad_(False)

    def call():
        if variant == "plain":
            with torch.no_grad():
                out = decoder(ids, attention_mask=mask if padded else None, output_hidden_states=True)
            return torch.stack(out.hidden_states, 1)[0, :, start:start + n0]
        if variant == "offload":
            model.to(device)
            try:
                enc = llm_encoder.encode_prompts(model, tokenizer, prompts, device=device, **options)
            finally:
                model.to("cpu")
            return enc.hidden_states[0, :, :n0]
        enc = llm_encoder.encode_prompts(model, tokenizer, prompts, device=device, **options)
        if variant == "adapter":
            with torch.no_grad():
                return hidden_states_to_context(enc.hidden_states.float(), adapter)
        return enc.hidden_states[0, :, :n0]

    with torch.no_grad():  # page in memory-mapped weights now, or the first call's RSS growth is the model
        for p in model.parameters():
            p.sum()
    result, out = measure(call, device, cfg["warmup"], cfg["repeats"])
    result.update({"variant": variant, "tokens": width, "prompt_tokens": n0, "prefix_tokens": start,
                   "states": None if variant == "adapter" else out.detach().float().cpu(),
                   "output_shape": tuple(out.shape)})
    return result


def plain_inputs(tokenizer, prompts, instruction: str, max_tokens: int, device):
    """The token sequence encode_prompts builds, for the plain forward: ids and mask [B, width], the prefix's length
    and the first prompt's."""
    prefix_ids, prompt_ids, *_ = llm_encoder.tokenize_prompts(tokenizer, prompts, instruction=instruction,
                                                              use_chat_template=True, max_tokens=max_tokens)
    rows = [prefix_ids + ids for ids in prompt_ids]
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    return ids.to(device), mask.to(device), len(prefix_ids), len(prompt_ids[0])


def measure(call, device, warmup: int, repeats: int) -> tuple[dict, torch.Tensor]:
    """Times `call` (after warm-up calls) and the memory it adds: RSS (and CUDA) high-water marks; its last output."""
    rss_loaded = _current_rss_kib()
    reset_ok = _reset_peak_rss()
    rss_before = _rss_kib()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    for _ in range(warmup):
        out = call()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    result = {"times_ms": times, "rss_loaded_mib": rss_loaded / 1024,
              "rss_growth_mib": (_rss_kib() - rss_before) / 1024, "rss_reset": reset_ok}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        result["cuda_growth_mib"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2 ** 20
    return result, out


def in_fresh_process(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default=DEFAULT_LLM, help="a .gguf file or Hugging Face folder")
    p.add_argument("--prompt", action="append", help=f"repeat for a batch (default: '{DEFAULT_PROMPT}')")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on the CPU, bfloat16 on CUDA (as LLM Loader's 'auto')")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 repeats after 1 warm-up call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per variant process (0 = default)")
    p.add_argument("--instruction", default="li-dit", choices=sorted(llm_encoder.INSTRUCTION_PRESETS))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--variants", default=None, help="comma list of " + ",".join(VARIANTS))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.prompt = args.prompt or [DEFAULT_PROMPT]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    llm_encoder.check_weights_path(args.llm)
    variants = args.variants.split(",") if args.variants else \
        ["plain", "encode", "adapter"] + (["offload"] if args.device == "cuda" else []) + ["cached", "dense"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; pick from {list(VARIANTS)}")
    if "offload" in variants and args.device != "cuda":
        raise SystemExit("the offload variant needs --device cuda")

    results = {}
    for v in variants:
        cfg = dict(variant=v, llm=args.llm, device=args.device, dtype=args.dtype, prompts=args.prompt,
                   instruction=args.instruction, max_tokens=args.max_tokens, repeats=args.repeats,
                   warmup=args.warmup, threads=args.threads)
        try:
            results[v] = in_fresh_process(run_variant, cfg)
        except Exception as e:  # one broken path must not hide the others' numbers
            results[v] = {"variant": v, "error": f"{type(e).__name__}: {e}"}
            print(f"{VARIANTS[v]}: FAILED {results[v]['error']}", file=sys.stderr)
            continue
        print(f"{VARIANTS[v]}: median {statistics.median(results[v]['times_ms']):.1f} ms", file=sys.stderr)

    print_table(args, results)
    return results


def print_table(args, results: dict) -> None:
    ok = {v: r for v, r in results.items() if "error" not in r}
    if not ok:
        raise SystemExit("every variant failed: " + "; ".join(r["error"] for r in results.values()))
    first = next(iter(ok.values()))
    base = statistics.median(ok["plain"]["times_ms"]) if "plain" in ok else None
    ref = ok.get("plain", {}).get("states")
    print(f"\n### Prompt encoding: {os.path.basename(args.llm.rstrip('/'))} on {args.device} ({args.dtype}, "
          f"{torch.get_num_threads() if not args.threads else args.threads} threads)\n")
    print(f"{len(args.prompt)} prompt(s), {first['tokens']} tokens per forward ({first['prefix_tokens']} "
          f"instruction/template + {first['prompt_tokens']} prompt), layers='all'; median of {args.repeats} "
          f"after {args.warmup} warm-up.\n")
    cuda = args.device == "cuda"
    head = ["variant", "median ms", "min ms", "vs (a)", "peak RSS growth MiB"]
    head += ["peak CUDA MiB", "CUDA growth MiB"] if cuda else []
    head += ["max abs diff vs (a)", "output"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|")
    for v, r in results.items():
        if "error" in r:
            msg = r["error"].splitlines()[0][:120].replace("|", "/")
            print("| " + " | ".join([VARIANTS[v], "failed"] + ["-"] * (len(head) - 3) + [msg]) + " |")
            continue
        med = statistics.median(r["times_ms"])
        ratio = f"{med / base:.2f}x" if base else "-"
        rss = f"{r['rss_growth_mib']:.1f}" + ("" if r["rss_reset"] else "*")
        if r["states"] is not None and ref is not None and r["states"].shape == ref.shape:
            diff = f"{(r['states'] - ref).abs().max().item():.2e}"
        else:
            diff = "-"
        row = [VARIANTS[v], f"{med:.1f}", f"{min(r['times_ms']):.1f}", ratio, rss]
        if cuda:
            row += [f"{r['cuda_peak_mib']:.0f}", f"{r['cuda_growth_mib']:.0f}"]
        row += [diff, "x".join(map(str, r["output_shape"]))]
        print("| " + " | ".join(row) + " |")
    if "encode" in ok and "dense" in ok:
        ratio = statistics.median(ok["encode"]["times_ms"]) / statistics.median(ok["dense"]["times_ms"])
        print(f"\nQuantized weights against dequantized at load, (b) / (f): {ratio:.2f}x; RSS with the LLM loaded "
              f"{ok['encode']['rss_loaded_mib']:.0f} against {ok['dense']['rss_loaded_mib']:.0f} MiB.")
    print(f"\nRSS with the LLM loaded: {first['rss_loaded_mib']:.0f} MiB. Output: hidden states [S, T, D] of the "
          "first prompt's tokens ((c): adapter context [B, T, 128]).")
    if not all(r["rss_reset"] for r in ok.values()):
        print("* the peak RSS could not be reset after loading; the load peak may hide the forward's.")


if __name__ == "__main__":
    main()

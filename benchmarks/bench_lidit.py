"""LI-DiT speed: denoising-step time, training throughput (with MFU on CUDA) and FLOPs of the paper's presets.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_lidit                        # default model, CPU
    .venv/bin/python -m benchmarks.bench_lidit --quick --threads 1    # tiny settings, while other jobs run
    .venv/bin/python -m benchmarks.bench_lidit --device cuda --peak-tflops 989

Tables (every ratio is against a baseline measured in the same run, on the same device):

(a) Denoising step of the default model (models/lidit/lidit-shapes-smollm2.safetensors, or --model) at 32x32,
    batch 1 and 4. Baseline: one pure model forward (no grad). `sample_euler` rows are the wall-clock of a whole
    --steps Euler run divided by --steps: with cfg 1 one forward + the Euler update per step, with cfg 3 two
    forwards (conditional + unconditional) per step, so about 2x is expected there. Contexts are random
    [B, --tokens, 128] encodings: the step time does not depend on what the tokens say. Without a model file the
    default training config is used with random weights (same shapes, same time), and the table says so.

(b) Training throughput of the default training config (training/train_lidit.py's defaults: hidden 128, depth 6,
    heads 4, patch 4, pos kernel 5, batch 64, one LLM Diff Adapter giving context_dims (128,)) in samples/s.
    Rows: forward only (baseline) -> flow_matching_loss + backward -> + AdamW step (one optimizer step of the
    LI-DiT) -> the trainer's whole step on cached LLM features (adapter over 31 x 576 SmolLM2 states, gradient
    clipping, EMA update), and the CPU cost of rendering one shapes-world batch (the trainer's data loader).
    On CPU always; on CUDA too (with --device cuda) under bf16 autocast with fp32 weights, as the trainer runs.
    GFLOP/step is counted with torch.utils.flop_counter.FlopCounterMode over one forward+backward (the AdamW
    update itself is not counted); on CPU the count is made on a 'meta' copy because FlopCounterMode does not see
    the CPU flash-attention kernel. MFU = achieved FLOP/s / (--peak-tflops x 1e12); 989 TFLOP/s is the H100 SXM
    dense bf16 peak. On the CPU the peak is measured in the same run: the GFLOP/s of a large square matmul
    (matmul_peak) in fp32, and in bf16 for the rows under bf16 autocast, which is what the training step's matmuls
    could reach at best on this machine and thread count. "trainer step, plain" is the trainer step in fp32 on the
    CPU (bf16 autocast on CUDA) with PyTorch's SDPA; the rows after it add, one at a time, what the trainer does by
    default on a CPU with native bf16 (--precision auto) and with --compile.

(c) Forward FLOPs per image of the paper's presets (adapters.lidit.PRESETS) at 256 px (a 32x32x16 latent of an
    8x VAE) with --preset-tokens LLM tokens of width 4096, counted on the 'meta' device (nothing is allocated or
    timed), against the default model's forward per 32 px image.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from adapters.checkpoint import load_lidit
from adapters.diff_adapter import LLMDiffAdapter
from adapters.lidit import (PRESETS, LIDiT, LIDiTConfig, flow_matching_loss, sample_euler, scores_attention,
                            set_attention_kernel)
from training.data import ShapesData
from training.loop import ema_update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_MODEL = os.path.join(ROOT, "models", "lidit", "lidit-shapes-smollm2.safetensors")
SMOLLM2_STATES, SMOLLM2_WIDTH = 31, 576  # embeddings + 30 blocks, hidden size 576
COMPILE_WARMUP = 3


def training_defaults() -> argparse.Namespace:
    """The trainer's own defaults, so this benchmark follows them when they change."""
    from training.train_lidit import parse_args
    return parse_args(["--llm", "unused.gguf", "--out", "unused"])


def default_config(ctx_dim: int) -> LIDiTConfig:
    a = training_defaults()
    return LIDiTConfig(in_channels=3, patch_size=a.patch_size, hidden_size=a.hidden_size, depth=a.depth,
                       num_heads=a.num_heads, context_dims=(ctx_dim,), refiner_depth=a.refiner_depth,
                       refiner_causal=a.refiner_causal, fusion=a.fusion, pos_kernel_size=a.pos_kernel_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to("meta")


def random_contexts(config: LIDiTConfig, batch: int, tokens: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = [torch.randn(batch, tokens, d, generator=g).to(device, dtype) for d in config.context_dims]
    masks = [torch.ones(batch, tokens, dtype=torch.long, device=device) for _ in config.context_dims]
    return ctx, masks


# ---------------------------------------------------------------------------------------------------------------
# (a) denoising step


def bench_denoise(args, device, dtype) -> tuple[list[list[str]], str, LIDiT]:
    if os.path.isfile(args.model):
        model, info = load_lidit(args.model)
        label = os.path.basename(args.model)
    else:
        if args.model != DEFAULT_MODEL:
            raise SystemExit(f"model file not found: {args.model}")
        torch.manual_seed(0)
        model = LIDiT(default_config(training_defaults().context_dim))
        label = "default training config, random weights (models/lidit/lidit-shapes-smollm2.safetensors not found)"
    model.eval().requires_grad_(False).to(device, dtype)
    res = args.resolution
    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, model.config.in_channels, res, res, generator=g).to(device, dtype)
        t = torch.full((batch,), 0.5, device=device)
        ctx, masks = random_contexts(model.config, batch, args.tokens, device, dtype)
        uctx, umasks = random_contexts(model.config, batch, 1, device, dtype, seed=1)
        uctx = [torch.zeros_like(c) for c in uctx]

        def forward():
            with torch.no_grad():
                model(x, t, ctx, masks)

        fwd = statistics.median(timed(forward, device, args.repeats * args.steps, args.warmup))
        meta = on_meta(model)
        flops = count_flops(lambda: meta(x.to("meta"), t.to("meta"), [c.to("meta") for c in ctx],
                                         [m.to("meta") for m in masks]))
        rows.append([f"{batch}", "model forward (baseline)", f"{fwd * 1e3:.2f}", "1.00x", f"{flops / 1e9:.3f}",
                     f"{flops / fwd / 1e9:.1f}"])
        for cfg in (1.0, args.cfg):
            def run():
                sample_euler(model, x, ctx, masks, steps=args.steps, cfg=cfg, uncond_contexts=uctx,
                             uncond_masks=umasks)
            per_step = statistics.median(timed(run, device, args.repeats, 1)) / args.steps
            calls = 1 if cfg == 1.0 else 2
            rows.append([f"{batch}", f"sample_euler per step, cfg {cfg:g} ({calls} forward{'s' * (calls > 1)})",
                         f"{per_step * 1e3:.2f}", f"{per_step / fwd:.2f}x", f"{calls * flops / 1e9:.3f}",
                         f"{calls * flops / per_step / 1e9:.1f}"])
    return rows, label, model


# ---------------------------------------------------------------------------------------------------------------
# (b) training throughput


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 20) -> float:
    """TFLOP/s of the fastest of `repeats` n x n matmuls in `dtype`: the machine's practical peak (the fastest, not
    the median, since other load only ever slows a run down)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sec = min(timed(lambda: a @ b, device, repeats, 2))
    return 2 * n ** 3 / sec / 1e12


def trainer_step(lidit, adapter, x0, hidden, masks, device, ema_decay: float, bf16: bool, scores_kernel: bool,
                 compiled: bool):
    """The trainer's step on its own copy of the models: AdamW on LI-DiT + adapter, clipping, EMA."""
    m, a = copy.deepcopy(lidit), copy.deepcopy(adapter)
    if scores_kernel:
        set_attention_kernel(m, scores_attention)
    params = list(m.parameters()) + list(a.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.99))
    ema = copy.deepcopy(m), copy.deepcopy(a)
    if compiled:
        m.compile()
        a.compile()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(m, x0, [a(hidden)], masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema[0], m, ema_decay)
        ema_update(ema[1], a, ema_decay)
    return step


def training_flops(lidit, adapter, x0, ctx, masks, hidden, device, autocast, with_backward: bool,
                   with_adapter: bool) -> int:
    """FLOPs of one forward (and backward): on the device itself on CUDA, on a meta copy on the CPU."""
    if device.type == "cuda":
        m, a, x, c, k, h = lidit, adapter, x0, ctx, masks, hidden
    else:
        m, a = on_meta(lidit), on_meta(adapter)
        x, h = x0.to("meta"), hidden.to("meta")
        c, k = [t.to("meta") for t in ctx], [t.to("meta") for t in masks]

    def fn():
        with torch.set_grad_enabled(with_backward), autocast():
            loss = flow_matching_loss(m, x, [a(h)] if with_adapter else c, k)
        if with_backward:
            loss.backward()
    n = count_flops(fn)
    m.zero_grad(set_to_none=True)
    a.zero_grad(set_to_none=True)
    return n


def training_cases(args, device, defaults) -> list[tuple]:
    """(what, step, FLOPs, bf16 autocast) per row: a bf16 row's MFU is against the bf16 matmul peak."""
    batch = args.train_batch
    torch.manual_seed(0)
    lidit = LIDiT(default_config(defaults.context_dim)).to(device)
    adapter = LLMDiffAdapter(SMOLLM2_WIDTH, SMOLLM2_STATES, defaults.context_dim).to(device)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 3, defaults.resolution, defaults.resolution, generator=g) * 2 - 1).to(device)
    ctx, masks = random_contexts(lidit.config, batch, args.tokens, device, torch.float32)
    hidden = torch.randn(batch, SMOLLM2_STATES, args.tokens, SMOLLM2_WIDTH, generator=g).to(device)
    use_amp = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else torch.autocast("cpu", enabled=False)

    opt = torch.optim.AdamW(lidit.parameters(), lr=1e-4, weight_decay=0.0, betas=(0.9, 0.99))

    def forward_only():
        with torch.no_grad(), autocast():
            flow_matching_loss(lidit, x0, ctx, masks)

    def loss_backward():
        with autocast():
            loss = flow_matching_loss(lidit, x0, ctx, masks)
        loss.backward()
        lidit.zero_grad(set_to_none=True)

    def adamw_step():
        with autocast():
            loss = flow_matching_loss(lidit, x0, ctx, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = lambda *flags: trainer_step(lidit, adapter, x0, hidden, masks, device, defaults.ema, *flags)  # noqa: E731
    flops = lambda *flags: training_flops(lidit, adapter, x0, ctx, masks, hidden, device, autocast, *flags)  # noqa
    f_fwd, f_bwd, f_full = flops(False, False), flops(True, False), flops(True, True)
    cases = [("forward only, no grad (baseline)", forward_only, f_fwd, use_amp),
             ("flow_matching_loss + backward", loss_backward, f_bwd, use_amp),
             ("+ AdamW step", adamw_step, f_bwd, use_amp),
             ("trainer step, plain: + adapter on 31x576 states, clip, EMA", step(use_amp, False, False), f_full,
              use_amp)]
    if device.type == "cpu":
        cases.append(("trainer step, --precision bf16 (CPU autocast), scores attention", step(True, True, False),
                      f_full, True))
    else:
        cases.append(("trainer step, scores attention", step(True, True, False), f_full, True))
    if not args.no_compile:
        cases.append(("trainer step, + --compile", step(True, True, True), f_full, True))
    return cases


def bench_training(args, device) -> list[list[str]]:
    defaults = training_defaults()
    batch = args.train_batch
    cases = training_cases(args, device, defaults)
    if device.type == "cuda":
        peaks = {True: args.peak_tflops}
    else:
        peaks = {False: matmul_peak(device, torch.float32), True: matmul_peak(device, torch.bfloat16)}
    rows, base, plain = [], None, None
    for name, fn, flops, bf16 in cases:
        # the first calls of a compiled step compile (the forward, then the backward and the AdamW update)
        warmup = max(args.warmup, COMPILE_WARMUP) if "compile" in name else args.warmup
        sec = statistics.median(timed(fn, device, args.train_steps, warmup))
        base = base or sec
        if name.startswith("trainer step, plain"):
            plain = sec
        tflops = flops / sec / 1e12
        rows.append([device.type, name, f"{batch / sec:.1f}", f"{sec * 1e3:.1f}", f"{sec / base:.2f}x",
                     f"{plain / sec:.2f}x" if plain else "-", f"{flops / 1e9:.2f}", f"{tflops * 1e3:.1f}",
                     f"{100 * tflops / peaks[bf16]:.1f}% ({'bf16' if bf16 else 'fp32'})"])
    if device.type == "cpu":
        data = ShapesData(defaults.pool_size, 0, defaults.resolution)
        sec = statistics.median(timed(lambda: data.sample(batch), device, max(1, args.train_steps), 1))
        rows.append(["cpu", "data: render one shapes-world batch", f"{batch / sec:.1f}", f"{sec * 1e3:.1f}",
                     f"{sec / base:.2f}x", "-", "-", "-", "-"])
        for bf16, peak in peaks.items():
            rows.append(["cpu", f"{'bf16' if bf16 else 'fp32'} matmul 2048x2048 (the peak, measured now)", "-", "-",
                         "-", "-", "-", f"{peak * 1e3:.1f}", "100%"])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# (c) preset FLOPs


def preset_flops(args, default_model: LIDiT) -> list[list[str]]:
    def forward_flops(model: LIDiT, channels: int, side: int, tokens: int) -> int:
        x = torch.zeros(1, channels, side, side, device="meta")
        ctx = [torch.zeros(1, tokens, d, device="meta") for d in model.config.context_dims]
        with torch.no_grad():
            return count_flops(lambda: model(x, torch.zeros(1, device="meta"), ctx))

    base_model = on_meta(default_model).float()
    base = forward_flops(base_model, base_model.config.in_channels, args.resolution, args.tokens)
    n_base = sum(p.numel() for p in default_model.parameters())
    space = "pixel space" if default_model.config.in_channels == 3 else "latent"
    rows = [[f"table (a)'s model ({n_base / 1e6:.2f}M)", f"{args.resolution} px, {space}", str(args.tokens),
             f"{base / 1e9:.3f}", "1x"]]
    for name in args.presets:
        with torch.device("meta"):
            model = LIDiT(LIDiTConfig(**PRESETS[name], context_dims=(args.preset_context_dim,)))
        n = sum(p.numel() for p in model.parameters())
        side = args.preset_resolution // 8
        flops = forward_flops(model, model.config.in_channels, side, args.preset_tokens)
        rows.append([f"{name} ({n / 1e9:.2f}B)", f"{args.preset_resolution} px ({side}x{side}x"
                     f"{model.config.in_channels} latent)", str(args.preset_tokens), f"{flops / 1e9:.1f}",
                     f"{flops / base:.0f}x"])
    return rows


# ---------------------------------------------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(head))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="LI-DiT .safetensors for table (a)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="(a) runs here; (b) runs on the CPU and, with cuda, on CUDA too")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="(a) weights: auto = float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batches", default="1,4", help="(a) batch sizes")
    p.add_argument("--steps", type=int, default=20, help="(a) Euler steps per sample_euler run")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--tokens", type=int, default=16, help="prompt tokens per context (shapes captions: 8-20)")
    p.add_argument("--repeats", type=int, default=5, help="(a) sample_euler runs timed (forwards: x --steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-batch", type=int, default=None, help="(b) default: the trainer's --batch-size (64)")
    p.add_argument("--train-steps", type=int, default=10, help="(b) optimizer steps timed per row")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense)")
    p.add_argument("--presets", default="LI-DiT-1B", help="(c) comma list of " + ",".join(PRESETS) + ", or ''")
    p.add_argument("--preset-resolution", type=int, default=256)
    p.add_argument("--preset-tokens", type=int, default=128)
    p.add_argument("--preset-context-dim", type=int, default=4096, help="LLM width (Llama-3-8B: 4096)")
    p.add_argument("--skip", default="", help="comma list of tables to leave out: a,b,c")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--no-compile", action="store_true", help="(b) leave out the torch.compile row (it compiles "
                   "for a minute or two)")
    p.add_argument("--quick", action="store_true", help="tiny settings: 4 steps, 2 repeats, batch 8, 2 train steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup, args.train_steps = 4, 2, 1, 2
        args.train_batch = args.train_batch or 8
    args.train_batch = args.train_batch or training_defaults().batch_size
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    for name in args.presets:
        if name not in PRESETS:
            p.error(f"unknown preset '{name}'; pick from {list(PRESETS)}")
    args.skip = set(s.strip() for s in args.skip.split(",") if s.strip())
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = f"{args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else
                                f" ({torch.get_num_threads()} threads)")
    model = None
    if "a" not in args.skip:
        rows, label, model = bench_denoise(args, device, dtype)
        print(f"\n### (a) LI-DiT denoising step: {label}\n\n{args.resolution}x{args.resolution}, {args.tokens} "
              f"prompt tokens, {where}, {args.dtype}; median over {args.repeats} sample_euler runs of "
              f"{args.steps} steps ({args.repeats * args.steps} forwards for the baseline).\n")
        table(["batch", "what", "ms per step", "vs forward", "GFLOP", "GFLOP/s"], rows, numeric_from=2)
    if "b" not in args.skip:
        rows = bench_training(args, torch.device("cpu"))
        if args.device == "cuda":
            rows += bench_training(args, device)
        print(f"### (b) Training throughput, default training config, batch {args.train_batch}\n\n"
              f"Median of {args.train_steps} steps after {args.warmup} warm-up; CUDA rows under bf16 autocast; "
              f"MFU: on the CPU against the matmul peak of the row's dtype measured in this run, on CUDA against "
              f"{args.peak_tflops:g} TFLOP/s.\n")
        table(["device", "what", "samples/s", "ms/step", "vs forward", "vs trainer step, plain", "GFLOP/step",
               "GFLOP/s", "MFU"], rows, numeric_from=2)
    if "c" not in args.skip and args.presets:
        if model is None:
            model = LIDiT(default_config(training_defaults().context_dim))
        rows = preset_flops(args, model)
        print("### (c) Forward FLOPs per image (counted on the meta device, not timed)\n")
        table(["model", "image", "text tokens", "GFLOP / forward", "vs (a)'s model"], rows, numeric_from=3)
        print(f"A {args.steps}-step sample with CFG costs 2 x {args.steps} forwards.")


if __name__ == "__main__":
    main()

"""Train LI-DiT (with the LLM Diff Adapter) on image-caption data, the LLM(s) frozen.

One device:            python -m training.train_lidit --llm models/LLM/x.gguf --out runs/x
Several GPUs/machines: accelerate launch -m training.train_lidit ...   (same code, same flags)

Data: the built-in procedural shapes world (`--data shapes`: captions in many wordings from
dataset/captions.py, held-out wordings and combinations never shown) or a folder of images with same-name .txt
captions. LLM features of every caption are computed once and cached in --out. `--text-encoder learned` trains
the no-LLM baseline instead: word embeddings learned from scratch over the training vocabulary, through the
same LI-DiT context path. Checkpoints are written every --save-every steps and picked up again with --resume;
the loss log is <out>/loss.csv. The model, its text streams and its export are in training/trainable.py.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import time

import torch
from accelerate import Accelerator
from tqdm import tqdm

from adapters.checkpoint import load_lidit
from adapters.lidit import PRESETS
from adapters.word_encoder import WordEncoder
from dataset import captions
from training import adapter_recipe
from training.checkpoints import (load_training_state, recover_checkpoint, restore_rng_streams, rng_streams,
                                  save_training_state, saved_rng_streams, seed_streams, start_run)
from training.data import FolderData, ShapesData
from training.loop import (DivergedError, LossLog, diverged, ema_update, lr_at, mixed_precision, train_step)
from training.trainable import (base_streams, build_model, export, init_from, new_text_streams,
                                progress_check, progress_scenes, unknown_words)

log = logging.getLogger("train_lidit")


def _text_flags(p: argparse.ArgumentParser) -> None:
    """The text streams: LLMs and their LLM Diff Adapter, or the no-LLM word encoder; adapter-only training."""
    p.add_argument("--llm", action="append", default=[],
                   help="LLM path (.gguf or HF folder); repeat to fuse several")
    p.add_argument("--text-encoder", default="llm", choices=["llm", "learned"],
                   help="'learned': the no-LLM baseline (word embeddings from scratch; no --llm)")
    p.add_argument("--base", default=None,
                   help="adapter-only training: freeze this LI-DiT file (and its own text encoders) and train an LLM "
                        "Diff Adapter on --llm with a second cross-attention in every block (one output file)")
    p.add_argument("--host-gate", default="learned", choices=["learned", "fixed"],
                   help="--base: learn the base branch's gate a*exp(b) beside the new one (the paper), or keep it at 1")
    adapter_recipe.add_flags(p, needs="--base")
    p.add_argument("--host-word-dropout", type=float, default=None,
                   help="--base with its own word encoder: share of the words of the base model's caption read as "
                        "<unk>, as it reads a word its training never had, while the LLM stream reads them; the "
                        "LLM branch learns to carry the words the base cannot read (default 0)")
    p.add_argument("--host-word-dropout-samples", type=float, default=None,
                   help="--host-word-dropout: the share of samples whose base caption loses words; the others keep "
                        "every word, so the LLM branch also learns to add nothing where the base read all of it "
                        "(default 1)")
    p.add_argument("--layers", default="all", help="'all' (through the LLM Diff Adapter), 'last', '-3', ...")
    p.add_argument("--instruction", default="li-dit", choices=["li-dit", "none"])
    p.add_argument("--block-outputs", default="states", choices=["states", "contributions"],
                   help="what the LLM Diff Adapter mixes: every block's hidden state, or its contribution (the state "
                        "in context minus the same token's state in a one-token prompt)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--context-dim", type=int, default=128, help="adapter output size (learned encoder: its width)")
    p.add_argument("--feature-noise", type=float, default=0.0,
                   help="std of Gaussian noise on the LLM Diff Adapter's fused block states while training (a ridge "
                        "penalty on its projection, for words that training never used)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """The LI-DiT: its size, token refiner and fusion."""
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="the paper's width, depth, heads and patch (adapters.lidit.PRESETS), in pixel space; "
                        "overrides --hidden-size, --depth, --num-heads and --patch-size")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--pos-kernel-size", type=int, default=5)
    p.add_argument("--pos-embed", default="conv+sincos", choices=["conv", "conv+sincos"])
    p.add_argument("--refiner-depth", type=int, default=2)
    p.add_argument("--refiner-causal", action="store_true", help="ablation: keep the causal mask in the refiner")
    p.add_argument("--fusion", default="collaborative", choices=["collaborative", "concat"])


def _data_flags(p: argparse.ArgumentParser) -> None:
    """The data: the shapes world's caption pool and its mix, or a folder; caption dropout."""
    p.add_argument("--data", default="shapes", help="'shapes' or a folder of images + .txt captions")
    p.add_argument("--mix", default="0.3,0.2,0.2,0.15,0.15",
                   help="shapes world: share of each kind of scene in a batch, in the order of "
                        "dataset.captions.KINDS (single, pair, relation, count, triple)")
    p.add_argument("--captions", default="full", choices=list(captions.LANGUAGES),
                   help="shapes world: the training pool's caption language (dataset.captions.LANGUAGES): every "
                        "seen phrasing, or the canonical one alone (one word per colour, shape, position and "
                        "relation, one template per kind, no frame) for a base model with a narrow text encoder")
    p.add_argument("--open-color-pool", type=float, default=0.0,
                   help="shapes world: training captions with colours beyond the seven (named, or described as 'the "
                        "color of ...'; dataset.captions.SEEN_OPEN_COLORS), per caption of --pool-size")
    p.add_argument("--open-color-share", type=float, default=0.4,
                   help="shapes world: share of the samples drawn from the --open-color-pool captions")
    p.add_argument("--pool-size", type=int, default=2000,
                   help="shapes world: distinct training captions (each LLM encodes them once; layouts are redrawn "
                        "for every sample)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="for classifier-free guidance")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """The run: where it writes, how long, how fast, and what it exports."""
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="lidit")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--export-weights", default="ema", choices=["ema", "raw"],
                   help="which weights go into the exported model files")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=24)
    p.add_argument("--cache-dir", default=None, help="LLM feature cache (default <out>/cache); runs may share it")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default=None,
                   help="fine-tune: start from this LI-DiT file's weights and its text encoders (same architecture, "
                        "LLMs and encoder settings; a word encoder's known words keep their embeddings, new words "
                        "start fresh), with a new optimizer and LR schedule. --resume still continues the run's own "
                        "checkpoint")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype of forward and backward (weights, AdamW and EMA stay fp32); auto: bf16 on "
                        "CUDA and on CPUs with native bf16 matmuls (AVX512-BF16, AMX), else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: it compiles at the start (and at every --resume), then takes "
                        "faster steps (benchmarks/bench_lidit.py)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (_text_flags, _model_flags, _data_flags, _run_flags):
        add_flags(p)
    args = p.parse_args(argv)
    if (args.text_encoder == "llm") != bool(args.llm):
        p.error("--text-encoder llm needs --llm (repeat to fuse several); --text-encoder learned takes none")
    if args.preset:
        preset = PRESETS[args.preset]
        args.hidden_size, args.depth, args.num_heads, args.patch_size = (
            preset[k] for k in ("hidden_size", "depth", "num_heads", "patch_size"))
    if args.feature_noise < 0 or (args.feature_noise and (args.text_encoder != "llm" or args.layers != "all")):
        p.error("--feature-noise is a standard deviation (>= 0) for the LLM Diff Adapter's input: it needs --llm and "
                "--layers all")
    if args.open_color_pool < 0 or not 0 <= args.open_color_share <= 1:
        p.error("--open-color-pool is a number of captions per --pool-size caption (>= 0); --open-color-share a "
                "share of samples, from 0 to 1")
    if args.init and args.base:
        p.error("--init fine-tunes a whole LI-DiT model; --base trains an adapter onto a frozen one: give one of them")
    if args.base and (len(args.llm) != 1 or args.layers != "all"):
        p.error("--base trains one LLM Diff Adapter: give exactly one --llm and --layers all")
    word_dropout = {"--host-word-dropout": args.host_word_dropout,
                    "--host-word-dropout-samples": args.host_word_dropout_samples}
    adapter_only = adapter_recipe.given(args) + [flag for flag, v in word_dropout.items() if v is not None]
    if not args.base and adapter_only:
        p.error(f"{', '.join(adapter_only)}: adapter-only training options, which need --base")
    if args.base:
        adapter_recipe.fill_defaults(args)
        args.host_word_dropout = args.host_word_dropout or 0.0
        if args.host_word_dropout_samples is None:
            args.host_word_dropout_samples = 1.0
        if error := adapter_recipe.problem(args):
            p.error(error)
        if not 0 <= args.host_word_dropout <= 1:
            p.error("--host-word-dropout is a share of words, from 0 to 1")
        if not 0 <= args.host_word_dropout_samples <= 1:
            p.error("--host-word-dropout-samples is a share of samples, from 0 to 1")
    return args


def resume(args, accelerator, ckpt: str, model, ema, opt, data) -> int:
    """The step to start from: a --resume run's checkpoint (weights, EMA, optimizer and, where saved, every rank's
    random streams), else 0."""
    step = 0
    if args.resume:
        if accelerator.is_main_process:
            recover_checkpoint(ckpt)  # finishes or rolls back a save that a kill interrupted
        accelerator.wait_for_everyone()
    if args.resume and os.path.isdir(ckpt):
        step = load_training_state(ckpt, model, ema, opt)
        accelerator.print(f"resumed from {ckpt} at step {step}")
    saved = saved_rng_streams(ckpt, accelerator.process_index, accelerator.num_processes) if step else None
    if saved:  # exactly where the saving run was: training in chunks equals one uninterrupted run
        restore_rng_streams(data, saved)
    elif step or accelerator.process_index:  # a fresh single-process run keeps the streams seeded before the init
        seed_streams(data, args.seed, step, accelerator.process_index)
    return step


def train(args, accelerator, model, raw, ema, opt, data, batch_inputs, ckpt: str, step: int) -> None:
    """The steps from `step` to --steps: one loss-log row per step, a checkpoint every --save-every."""
    loss_log = LossLog(os.path.join(args.out, "loss.csv"), step) if accelerator.is_main_process else None
    bar = tqdm(total=args.steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    t0, seen = time.time(), 0
    while step < args.steps:
        x0, idx = data.sample(args.batch_size)
        batch_captions = [data.captions[i] if random.random() >= args.caption_dropout else "" for i in idx]
        host_captions = [c if random.random() >= args.host_text_dropout else "" for c in batch_captions] \
            if args.host_text_dropout else None
        hidden = batch_inputs(batch_captions, host_captions)
        if args.base and args.host_word_dropout:  # the base's own streams come first, the new LLM stream last
            hidden = [(unknown_words(x, a, args.host_word_dropout, args.host_word_dropout_samples), m)
                      if isinstance(a, WordEncoder) else (x, m)
                      for (x, m), a in zip(hidden[:-1], raw.adapters[:-1])] + hidden[-1:]
        try:
            loss = train_step(model, opt, accelerator, x0, [h for h, _ in hidden], [m for _, m in hidden],
                              lr_at(step, args))
        except DivergedError as e:
            raise diverged(step + 1, e, "Lower --lr, or train in fp32 (--precision fp32): on CPU, adapter-only runs "
                           "(--base) under bf16 autocast with --compile can give NaN gradients (eager bf16 does "
                           "not: or drop --compile).") from None
        ema_update(ema, raw, args.ema)
        step += 1
        seen += args.batch_size * accelerator.num_processes
        rate = seen / (time.time() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", sps=f"{rate:.1f}")
        acc = ""
        save_now = step % args.save_every == 0 or step == args.steps
        if save_now and accelerator.is_main_process and args.data == "shapes" and args.eval_samples:
            acc = f"{progress_check(ema, batch_inputs, args, accelerator.device, args.eval_samples):.3f}"
            accelerator.print(f"step {step}: held-out single-object accuracy (EMA) {acc}")
        # every rank takes part in gathering the streams; the main process writes them
        rng = {k: accelerator.gather(v[None]) for k, v in rng_streams(data).items()} if save_now else None
        if accelerator.is_main_process:
            loss_log.write([step, f"{loss.item():.5f}", f"{lr_at(step - 1, args):.6g}", f"{rate:.2f}", acc])
            if save_now:
                save_training_state(ckpt, raw, ema, opt, step, args, rng)
    bar.close()
    if loss_log:
        loss_log.close()


def main(argv=None):
    args = parse_args(argv)
    start_run(args)
    accelerator = Accelerator(mixed_precision=mixed_precision(args.precision))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    data = ShapesData(args.pool_size, args.seed, args.resolution, args.mix, args.captions, args.open_color_pool,
                      args.open_color_share) \
        if args.data == "shapes" else FolderData(args.data, args.seed, args.resolution)
    eval_captions = [s.caption for s in progress_scenes(args.eval_samples)] if args.data == "shapes" else []
    all_captions = list(dict.fromkeys(data.captions + eval_captions))

    streams = new_text_streams(args, all_captions, data.captions, accelerator)
    base = None
    if args.base:  # the base model's own streams first, frozen; the new LLM stream feeds only the new branches
        base, base_info = load_lidit(args.base)
        streams = base_streams(base_info, args.base, all_captions, args, accelerator) + streams
        if args.host_word_dropout and not any(isinstance(e, WordEncoder) for _, e, _, _ in streams[:-1]):
            raise SystemExit(f"--host-word-dropout reads words of the base model's own word encoder as <unk>, and "
                             f"'{args.base}' reads its prompt through an LLM: use --host-text-dropout instead.")

    def batch_inputs(batch_captions: list[str], host_captions: list[str] | None = None):
        """Per stream (input, mask); a --base model's own streams read host_captions where given."""
        host_captions = batch_captions if host_captions is None else host_captions
        return [to_input(host_captions if i < len(streams) - 1 else batch_captions)
                for i, (to_input, _, _, _) in enumerate(streams)]

    model = build_model(args, streams, base)
    if args.init:
        accelerator.print(f"initialised from {init_from(args.init, model, [s for _, _, _, s in streams])}")
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0,
                            betas=(0.9, 0.99))
    ckpt = os.path.join(args.out, "checkpoint")
    step = resume(args, accelerator, ckpt, model, ema, opt, data)
    if args.compile:
        # in place (parameter names, and so checkpoints, stay those of the eager model), and only the networks: the
        # noise and t of the loss are drawn outside, by torch's own generator, as in an eager run
        model.lidit.compile()
        for adapter in model.adapters:
            adapter.compile()
    model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)
    ema.to(accelerator.device)
    n_params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    accelerator.print(f"LI-DiT {n_params / 1e6:.2f}M trainable parameters, context dims "
                      f"{[dim for _, _, dim, _ in streams]}, mixed precision {accelerator.mixed_precision}"
                      f"{', compiled' if args.compile else ''}")
    train(args, accelerator, model, raw, ema, opt, data, batch_inputs, ckpt, step)
    if accelerator.is_main_process:
        accelerator.print(f"wrote {export(args, raw, ema, [s for _, _, _, s in streams])}")


if __name__ == "__main__":
    main()

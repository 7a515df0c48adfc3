"""Train LI-DiT (with the LLM Diff Adapter) on image-caption data, the LLM(s) frozen.

One device:            python -m training.train_lidit --llm models/LLM/x.gguf --out runs/x
Several GPUs/machines: accelerate launch -m training.train_lidit ...   (same code, same flags)

Data: the built-in procedural shapes world (`--data shapes`: captions in many wordings from
dataset/captions.py, held-out wordings and combinations never shown) or a folder of images with same-name .txt
captions. LLM features of every caption are computed once and cached in --out. `--text-encoder learned` trains
the no-LLM baseline instead: word embeddings learned from scratch over the training vocabulary, through the
same LI-DiT context path. Checkpoints are written every --save-every steps and picked up again with --resume;
the loss log is <out>/loss.csv.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import random
import shutil
import time

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from adapters.checkpoint import (load_adapter, load_lidit, load_word_encoder, save_adapter, save_host_adapter,
                                 save_lidit, save_word_encoder, written_atomically)
from adapters.conditioning import hidden_states_to_context
from adapters.diff_adapter import REFINER_HEAD_DIM, AdaptedLIDiT, HostAdapter, LLMDiffAdapter, lidit_sites
from adapters.lidit import (PRESETS, LIDiT, LIDiTConfig, flow_matching_loss, sample_euler, scores_attention,
                            set_attention_kernel)
from adapters.word_encoder import WordEncoder, build_vocabulary
from dataset import captions, shapes_world
from dataset.features import caption_features, collate, encoder_settings, settings_of

log = logging.getLogger("train_lidit")

# The adapter-only recipe of both trainers (--base here, train_comfy_adapter): docs/results.md, "The LLM Diff Adapter
# on an existing model", has the runs that chose it.
HOST_TEXT_DROPOUT = 0.5
LLM_GATE = 1.0
ADAPTER_REFINER_DEPTH = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", action="append", default=[],
                   help="LLM path (.gguf or HF folder); repeat to fuse several")
    p.add_argument("--text-encoder", default="llm", choices=["llm", "learned"],
                   help="'learned': the no-LLM baseline (word embeddings from scratch; no --llm)")
    p.add_argument("--base", default=None,
                   help="adapter-only training: freeze this LI-DiT file (and its own text encoders) and train an LLM "
                        "Diff Adapter on --llm with a second cross-attention in every block (one output file)")
    p.add_argument("--host-gate", default="learned", choices=["learned", "fixed"],
                   help="--base: learn the base branch's gate a*exp(b) beside the new one (the paper), or keep it at 1")
    p.add_argument("--host-text-dropout", type=float, default=None,
                   help="--base: share of samples whose base model's own text streams get the empty prompt while "
                        f"the new LLM stream keeps the caption, so that the LLM branch has to carry the meaning "
                        f"(default {HOST_TEXT_DROPOUT})")
    p.add_argument("--llm-gate", type=float, default=None,
                   help="--base: the new branches' gate a at the start: 0 closed (the paper), > 0 open with the value "
                        f"projection at zero (adapters.diff_adapter.DecoupledCrossAttention; default {LLM_GATE})")
    p.add_argument("--adapter-refiner-depth", type=int, default=None,
                   help="--base: bidirectional token refiner blocks after the adapter's projection "
                        f"(adapters.diff_adapter.LLMDiffAdapter; default {ADAPTER_REFINER_DEPTH})")
    p.add_argument("--data", default="shapes", help="'shapes' or a folder of images + .txt captions")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="lidit")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="the paper's width, depth, heads and patch (adapters.lidit.PRESETS), in pixel space; "
                        "overrides --hidden-size, --depth, --num-heads and --patch-size")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--pos-kernel-size", type=int, default=5)
    p.add_argument("--pos-embed", default="conv+sincos", choices=["conv", "conv+sincos"])
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
    p.add_argument("--refiner-depth", type=int, default=2)
    p.add_argument("--refiner-causal", action="store_true", help="ablation: keep the causal mask in the refiner")
    p.add_argument("--fusion", default="collaborative", choices=["collaborative", "concat"])
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
    p.add_argument("--caption-dropout", type=float, default=0.1, help="for classifier-free guidance")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--export-weights", default="ema", choices=["ema", "raw"],
                   help="which weights go into the exported model files")
    p.add_argument("--pool-size", type=int, default=2000,
                   help="shapes world: distinct training captions (each LLM encodes them once; layouts are redrawn "
                        "for every sample)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=24)
    p.add_argument("--cache-dir", default=None, help="LLM feature cache (default <out>/cache); runs may share it")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype of forward and backward (weights, AdamW and EMA stay fp32); auto: bf16 on "
                        "CUDA and on CPUs with native bf16 matmuls (AVX512-BF16, AMX), else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: a minute or two of compiling at the start (and at every --resume), "
                        "then faster steps (benchmarks/bench_lidit.py)")
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
    if args.base and (len(args.llm) != 1 or args.layers != "all"):
        p.error("--base trains one LLM Diff Adapter: give exactly one --llm and --layers all")
    adapter_only = (args.host_text_dropout, args.llm_gate, args.adapter_refiner_depth)
    if not args.base and any(a is not None for a in adapter_only):
        p.error("--host-text-dropout, --llm-gate and --adapter-refiner-depth shape adapter-only training: they "
                "need --base")
    if args.base:
        args.host_text_dropout = HOST_TEXT_DROPOUT if args.host_text_dropout is None else args.host_text_dropout
        args.llm_gate = LLM_GATE if args.llm_gate is None else args.llm_gate
        args.adapter_refiner_depth = ADAPTER_REFINER_DEPTH if args.adapter_refiner_depth is None \
            else args.adapter_refiner_depth
        if not 0 <= args.host_text_dropout <= 1:
            p.error("--host-text-dropout is a share of samples, from 0 to 1")
        if error := adapter_refiner_error(args.adapter_refiner_depth, args.context_dim):
            p.error(error)
    return args


def adapter_refiner_error(depth: int, context_dim: int) -> str | None:
    """What is wrong with --adapter-refiner-depth for this --context-dim (both trainers), or None."""
    if depth < 0 or (depth and context_dim % REFINER_HEAD_DIM):
        return (f"--adapter-refiner-depth is a number of blocks (>= 0), and a refiner needs --context-dim divisible "
                f"by {REFINER_HEAD_DIM} (got depth {depth}, context dim {context_dim})")
    return None


class ShapesData:
    """The training pool of dataset/captions.py (fixed captions: seen wordings, seen combinations), each sample
    drawn in a fresh layout that its caption is true of. open_color_pool: captions with colours beyond the seven
    (captions.SEEN_OPEN_COLORS), per caption of the seven-colour pool; open_color_share: of the samples drawn from
    them."""

    def __init__(self, pool_size: int, seed: int, resolution: int, mix: str = "0.3,0.2,0.2,0.15,0.15",
                 language: str = "full", open_color_pool: float = 0.0, open_color_share: float = 0.0):
        self.scenes = captions.training_pool(pool_size, seed=0, language=language)
        open_scenes = captions.training_pool(round(open_color_pool * pool_size), seed=0, language=language,
                                             open_colors=captions.SEEN_OPEN_COLORS) if open_color_pool else []
        self.captions = [s.caption for s in self.scenes + open_scenes] + [""]
        self.rng = random.Random(seed)
        self.resolution = resolution
        self.by_kind = {k: [i for i, s in enumerate(self.scenes) if s.kind == k] for k in captions.KINDS}
        self.open_by_kind = {k: [len(self.scenes) + i for i, s in enumerate(open_scenes) if s.kind == k]
                             for k in captions.KINDS}
        self.scenes += open_scenes
        self.open_share = open_color_share if open_scenes else 0.0
        self.mix = [float(w) for w in mix.split(",")]
        if len(self.mix) != len(captions.KINDS):
            raise SystemExit(f"--mix takes {len(captions.KINDS)} shares ({', '.join(captions.KINDS)}).")

    def sample(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        kinds = self.rng.choices(captions.KINDS, weights=self.mix, k=batch_size)
        idx = [self.rng.choice((self.open_by_kind if self.open_share and self.rng.random() < self.open_share
                                else self.by_kind)[k]) for k in kinds]
        imgs = [shapes_world.render(captions.relayout(self.scenes[i], self.rng), self.resolution, self.rng)
                for i in idx]
        return torch.stack(imgs) * 2 - 1, idx  # pixel space in [-1, 1], as ComfyUI's pixel_space VAE expects


class FolderData:
    EXTS = (".png", ".jpg", ".jpeg", ".webp")

    def __init__(self, folder: str, seed: int, resolution: int):
        from PIL import Image
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(self.EXTS))
        self.items = []
        for f in files:
            txt = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
            if os.path.exists(txt):
                self.items.append((os.path.join(folder, f), open(txt, encoding="utf-8").read().strip()))
        if not self.items:
            raise SystemExit(f"No image with a same-name .txt caption in '{folder}'.")
        self.captions = [c for _, c in self.items] + [""]
        self.rng = random.Random(seed)
        self.resolution = resolution
        self.Image = Image

    def image(self, i: int) -> torch.Tensor:
        """Image i, centre-cropped to the resolution: [3, H, W] in [0, 1]."""
        import torchvision.transforms.functional as TF
        img = self.Image.open(self.items[i][0]).convert("RGB")
        return TF.to_tensor(TF.center_crop(TF.resize(img, self.resolution), self.resolution))

    def sample(self, batch_size: int):
        idx = [self.rng.randrange(len(self.items)) for _ in range(batch_size)]
        return torch.stack([self.image(i) for i in idx]) * 2 - 1, idx


LR_FLOOR = 0.1  # the cosine schedule ends at this share of --lr, not at 0
RUN_FILES = ("loss.csv", "checkpoint", "checkpoint.partial", "checkpoint.old")  # what a run leaves in its --out


def refuse_existing_run(out: str, resume: bool) -> None:
    """Without --resume a run starts its loss log afresh and replaces the checkpoint at its first save, so it stops,
    before writing anything, where --out holds a run already (both trainers)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if found and not resume:
        raise SystemExit(f"--out '{out}' already holds a run ({', '.join(found)}): add --resume to continue it, or "
                         "give a new --out to start a new run.")


def mixed_precision(precision: str) -> str:
    """--precision -> Accelerator's mixed_precision."""
    if precision == "auto":
        fast_bf16 = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precision = "bf16" if fast_bf16 else "fp32"
    return "no" if precision == "fp32" else "bf16"


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainable(torch.nn.Module):
    """LI-DiT plus, per text stream, an optional LLM Diff Adapter (LLM) or the learned WordEncoder (no-LLM
    baseline): what the optimizer updates."""

    def __init__(self, lidit: LIDiT, adapters: list[LLMDiffAdapter | WordEncoder | None]):
        super().__init__()
        self.lidit = lidit
        self.adapters = torch.nn.ModuleList([a if a is not None else torch.nn.Identity() for a in adapters])
        self.has_adapter = [a is not None for a in adapters]

    def contexts(self, inputs: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """inputs[i]: LLM hidden states [B, S, T, D], or token ids [B, T] for a WordEncoder; masks[i]: [B, T]."""
        return [a(x) if isinstance(a, WordEncoder) else hidden_states_to_context(x, a if use else None, m)
                for x, m, a, use in zip(inputs, masks, self.adapters, self.has_adapter)]

    def forward(self, x0, inputs, masks, noise=None, t=None) -> torch.Tensor:
        """The flow-matching loss; called through the prepared (DDP) model so that gradients sync across ranks."""
        return flow_matching_loss(self.lidit, x0, self.contexts(inputs, masks), masks, noise=noise, t=t)


def text_streams(args, all_captions: list[str], train_captions: list[str], accelerator):
    """Per text stream: a function captions -> (input, mask) for Trainable.contexts, its encoder module (adapter,
    WordEncoder or None), its context size and its settings (the model file's metadata)."""
    if args.text_encoder == "learned":
        encoder = WordEncoder(build_vocabulary(train_captions), args.context_dim, args.max_tokens)
        settings = {"type": "learned", "max_tokens": args.max_tokens, "vocabulary_size": len(encoder.vocabulary)}
        return [(encoder.tokenize, encoder, args.context_dim, settings)]
    streams = []
    for llm in args.llm:
        s = encoder_settings(llm, args.layers, args.instruction, args.max_tokens,
                             contributions=args.block_outputs == "contributions")
        with accelerator.main_process_first():
            feats, num_states = caption_features(llm, all_captions, s,
                                                 args.cache_dir or os.path.join(args.out, "cache"))
        by_caption = dict(zip(all_captions, feats))
        S, _, D = feats[0].shape
        adapter = LLMDiffAdapter(D, num_states, args.context_dim, args.feature_noise) if args.layers == "all" else None
        streams.append((lambda caps, f=by_caption: collate([f[c] for c in caps]), adapter,
                        args.context_dim if adapter is not None else S * D, {"type": "llm", **s}))
    return streams


def base_streams(base_info: dict, base_path: str, all_captions: list[str], args, accelerator):
    """The frozen text streams of a --base model, as text_streams gives them: its learned word encoder or its
    LLM(s) (looked up beside --llm) through its own adapters, all frozen."""
    streams, folder = [], os.path.dirname(os.path.abspath(base_path))
    for entry in base_info["text_encoders"]:
        if entry.get("type") == "learned":
            encoder, _ = load_word_encoder(os.path.join(folder, entry["encoder"]))
            streams.append((encoder.tokenize, encoder.requires_grad_(False), encoder.dim, entry))
            continue
        llm = os.path.join(os.path.dirname(os.path.abspath(args.llm[0])), entry["llm"])
        settings = settings_of(entry)
        with accelerator.main_process_first():
            feats, _ = caption_features(llm, all_captions, settings, args.cache_dir or os.path.join(args.out, "cache"))
        adapter = load_adapter(os.path.join(folder, entry["adapter"]))[0].requires_grad_(False) \
            if entry.get("adapter") else None
        by_caption = dict(zip(all_captions, feats))
        streams.append((lambda caps, f=by_caption: collate([f[c] for c in caps]), adapter, None, entry))
    return streams


def host_adapter_of(trainable: Trainable) -> HostAdapter:
    """The trained parts of an adapter-only run (its last text stream's adapter and the LI-DiT branches) as one
    HostAdapter, ready to save."""
    adapter, lidit = trainable.adapters[-1], trainable.lidit
    host = HostAdapter(adapter.llm_hidden_size, adapter.num_hidden_states, adapter.context_dim,
                       lidit_sites(lidit.base.config), "decoupled", refiner_depth=adapter.refiner_depth)
    host.adapter.load_state_dict(adapter.state_dict())
    host.branches.load_state_dict(lidit.branches.state_dict())
    return host


def heldout_scenes(num: int) -> list[shapes_world.Scene]:
    """The trainer's progress check: single objects in combinations training never shows, in seen wordings."""
    rng = random.Random(1234)
    return [captions.generate(rng, "single", "seen", "unseen") for _ in range(num)]


def train_step(model, opt, accelerator, x0, hidden, masks, lr: float, noise=None, t=None) -> torch.Tensor:
    """One optimizer step on this rank's batch; gradients are averaged over ranks by DDP's hooks. Returns the loss
    averaged over ranks (what the log shows)."""
    for g in opt.param_groups:
        g["lr"] = lr
    device = accelerator.device
    noise, t = (v if v is None else v.to(device) for v in (noise, t))
    with accelerator.autocast():
        loss = model(x0.to(device), [h.to(device) for h in hidden], [m.to(device) for m in masks], noise, t)
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    check_gradients(accelerator.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    return accelerator.reduce(loss.detach(), "mean")


class DivergedError(RuntimeError):
    """A non-finite gradient; raised before the optimizer step, so the weights stay as they were."""


def check_gradients(grad_norm: torch.Tensor) -> None:
    if not torch.isfinite(grad_norm):
        raise DivergedError(f"the gradient norm is {grad_norm.item()}")


def diverged(step: int, error: DivergedError, fix: str) -> SystemExit:
    """The error that ends a run at its first non-finite gradient, naming the step and the trainer's fix."""
    return SystemExit(f"Training diverged at step {step}: {error}. Nothing from this step on was saved; --resume "
                      f"continues from the last checkpoint. {fix}")


STREAM_STRIDE = 1_000_003  # seeds of (seed, step) pairs never coincide for runs under a million steps
RANK_STRIDE = 7_919


def seed_streams(data, seed: int, step: int, rank: int) -> None:
    """Data, caption dropout and noise streams of one rank from (seed, step, rank): every rank draws its own
    samples. A resume without the saved streams (another number of processes) continues with new draws."""
    stream = seed * STREAM_STRIDE + step + rank * RANK_STRIDE
    data.rng = random.Random(stream)
    torch.manual_seed(stream)
    random.seed(stream)


def _python_rng_tensor(state: tuple) -> torch.Tensor:
    version, words, gauss_next = state  # Mersenne Twister words (< 2**32, exact in float64), a cached normal or None
    return torch.tensor([version, *words, gauss_next is not None, gauss_next or 0.0], dtype=torch.float64)


def _python_rng_state(t: torch.Tensor) -> tuple:
    v = t.tolist()
    return int(v[0]), tuple(int(w) for w in v[1:-2]), v[-1] if v[-2] else None


def rng_streams(data) -> dict[str, torch.Tensor]:
    """This rank's noise (torch), dropout (random) and data streams as tensors, so that ranks can gather them."""
    streams = {"torch": torch.get_rng_state().to(torch.float64),
               "random": _python_rng_tensor(random.getstate()), "data": _python_rng_tensor(data.rng.getstate())}
    if torch.cuda.is_available():
        streams["cuda"] = torch.cuda.get_rng_state().to(torch.float64)
    return streams


def restore_rng_streams(data, streams: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(streams["torch"].to(torch.uint8))
    random.setstate(_python_rng_state(streams["random"]))
    data.rng.setstate(_python_rng_state(streams["data"]))
    if "cuda" in streams and torch.cuda.is_available():
        torch.cuda.set_rng_state(streams["cuda"].to(torch.uint8))


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")
RNG_FILE = "rng.safetensors"  # optional: checkpoints from before it still resume, on fresh streams


def saved_rng_streams(path: str, rank: int, num_processes: int) -> dict[str, torch.Tensor] | None:
    """This rank's streams from a checkpoint made by as many processes, else None."""
    file = os.path.join(path, RNG_FILE)
    if not os.path.isfile(file):
        return None
    streams = load_file(file)
    if any(v.shape[0] != num_processes for v in streams.values()):
        log.info("The checkpoint's random streams are from another number of processes; drawing fresh ones.")
        return None
    return {k: v[rank] for k, v in streams.items()}


def save_training_state(path: str, trainable, ema, opt, step: int, args,
                        rng: dict[str, torch.Tensor] | None = None) -> None:
    """Writes <path>.partial (state.json last, so a complete one has it), then swaps it in for <path>. At every
    point of a kill one complete checkpoint exists among <path>, <path>.partial and <path>.old, and
    recover_checkpoint finds the newest. rng: every rank's streams ([ranks, ...] each), so that a resumed run
    draws what the uninterrupted one would have."""
    tmp, old = path + ".partial", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a killed save
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in trainable.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    opt_state = opt.state_dict()
    tensors = {}
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            tensors[f"{pid}.{name}"] = val.detach().reshape(-1) if val.dim() == 0 else val.detach().contiguous()
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    if rng is not None:
        save_file({k: v.contiguous() for k, v in rng.items()}, os.path.join(tmp, RNG_FILE))
    state = {"step": step, "param_groups": opt_state["param_groups"], "args": vars(args)}
    with written_atomically(os.path.join(tmp, "state.json")) as partial, open(partial, "w") as f:
        json.dump(state, f)
    if os.path.isdir(path):  # complete (only ever made by the rename below), so a leftover .old is not needed
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: str) -> int | None:
    """The step of a complete checkpoint folder, None for a missing or half-written one."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            step = int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if all(os.path.isfile(os.path.join(path, n)) for n in CHECKPOINT_FILES) else None


def recover_checkpoint(path: str) -> int | None:
    """After a kill inside save_training_state: the newest complete checkpoint among <path>, <path>.partial and
    <path>.old becomes <path> again and the others are removed. Returns its step (None: no checkpoint)."""
    found = {p: checkpoint_step(p) for p in (path, path + ".partial", path + ".old")}
    found = {p: s for p, s in found.items() if s is not None}
    if not found:
        return None
    best = max(found, key=lambda p: found[p])  # on a tie the first, <path>
    if best != path:
        shutil.rmtree(path, ignore_errors=True)  # incomplete or older; `best` stays complete meanwhile
        os.replace(best, path)
    for leftover in (path + ".partial", path + ".old"):
        shutil.rmtree(leftover, ignore_errors=True)
    return found[best]


def load_training_state(path: str, trainable, ema, opt=None) -> int:
    """The checkpoint's weights and EMA, and its optimizer state where opt is given; returns its step."""
    try:
        trainable.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    except RuntimeError as e:
        raise SystemExit(f"The checkpoint in '{path}' holds another model than these flags build "
                         f"({' '.join(str(e).split())[:300]}). Resume with the flags the run was started with: "
                         f"they are under 'args' in {os.path.join(path, 'state.json')}.") from e
    ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    if opt is not None:
        load_optimizer_state(path, opt)
    with open(os.path.join(path, "state.json")) as f:
        return int(json.load(f)["step"])


def load_optimizer_state(path: str, opt) -> None:
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    opt_state = {"state": {}, "param_groups": state["param_groups"]}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        opt_state["state"].setdefault(int(pid), {})[name] = val.reshape(()) if name == "step" else val
    opt.load_state_dict(opt_state)


class LossLog:
    """<out>/loss.csv, one row per step. A step's row is written before its checkpoint, and on resume the rows
    after the checkpoint are dropped (those steps are redone), so a kill anywhere leaves each step logged once."""
    HEADER = ["step", "loss", "lr", "samples_per_s", "heldout_accuracy"]

    def __init__(self, path: str, keep_until: int):
        rows = self.rows_until(path, keep_until)
        with written_atomically(path) as partial, open(partial, "w", newline="") as f:  # a kill keeps the old log
            csv.writer(f).writerows([self.HEADER] + rows)
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)

    @classmethod
    def rows_until(cls, path: str, step: int) -> list[list[str]]:
        if not os.path.exists(path):
            return []
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        kept = {}
        for row in rows:  # a torn last row (killed mid-write) has too few fields
            if len(row) == len(cls.HEADER) and row[0].isdigit() and int(row[0]) <= step:
                kept.setdefault(int(row[0]), row)
        return [kept[k] for k in sorted(kept)]

    def write(self, row: list) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> LossLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def evaluate(model: Trainable, batch_inputs, args, device, num: int) -> float:
    """Held-out single-object prompts (heldout_scenes), Euler 20 steps, CFG 3: share the checker passes."""
    scenes = heldout_scenes(num)
    hidden = batch_inputs([s.caption for s in scenes])
    uncond = batch_inputs([""] * len(scenes))
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(len(scenes), 3, args.resolution, args.resolution, generator=g).to(device)
    masks, umasks = [m.to(device) for _, m in hidden], [m.to(device) for _, m in uncond]
    ctx = model.contexts([h.to(device) for h, _ in hidden], masks)
    uctx = model.contexts([h.to(device) for h, _ in uncond], umasks)
    x = sample_euler(model.lidit, noise, ctx, masks, steps=20, cfg=3.0, uncond_contexts=uctx, uncond_masks=umasks)
    imgs = ((x.float().cpu() + 1) / 2).clamp(0, 1)
    return sum(shapes_world.check(img, s)["overall"] for img, s in zip(imgs, scenes)) / len(scenes)


def main(argv=None):
    args = parse_args(argv)
    refuse_existing_run(args.out, args.resume)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(mixed_precision=mixed_precision(args.precision))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    data = ShapesData(args.pool_size, args.seed, args.resolution, args.mix, args.captions, args.open_color_pool,
                      args.open_color_share) \
        if args.data == "shapes" else FolderData(args.data, args.seed, args.resolution)
    eval_captions = [s.caption for s in heldout_scenes(args.eval_samples)] if args.data == "shapes" else []
    all_captions = list(dict.fromkeys(data.captions + eval_captions))

    streams = text_streams(args, all_captions, data.captions, accelerator)
    if args.base:  # the base model's own streams first, frozen; the new LLM stream feeds only the new branches
        base, base_info = load_lidit(args.base)
        streams = base_streams(base_info, args.base, all_captions, args, accelerator) + streams
    adapters = [encoder for _, encoder, _, _ in streams]
    context_dims = [dim for _, _, dim, _ in streams]
    settings = [s for _, _, _, s in streams]

    def batch_inputs(batch_captions: list[str], host_captions: list[str] | None = None):
        """Per stream (input, mask); a --base model's own streams read host_captions where given."""
        host_captions = batch_captions if host_captions is None else host_captions
        return [to_input(host_captions if i < len(streams) - 1 else batch_captions)
                for i, (to_input, _, _, _) in enumerate(streams)]
    if args.base:
        host = HostAdapter(adapters[-1].llm_hidden_size, adapters[-1].num_hidden_states, args.context_dim,
                           lidit_sites(base.config), "decoupled", args.feature_noise, args.llm_gate,
                           args.adapter_refiner_depth)
        if args.host_gate == "fixed":
            for branch in host.branches:
                branch.host_gate_a.requires_grad_(False)
                branch.host_gate_b.requires_grad_(False)
        model = Trainable(AdaptedLIDiT(base.requires_grad_(False), host.branches), adapters[:-1] + [host.adapter])
    else:
        config = LIDiTConfig(in_channels=3, patch_size=args.patch_size, hidden_size=args.hidden_size,
                             depth=args.depth, num_heads=args.num_heads, context_dims=tuple(context_dims),
                             refiner_depth=args.refiner_depth, refiner_causal=args.refiner_causal, fusion=args.fusion,
                             pos_kernel_size=args.pos_kernel_size, pos_embed=args.pos_embed)
        model = Trainable(LIDiT(config), adapters)
    set_attention_kernel(model, scores_attention)  # the same function as SDPA's; faster here (its docstring)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0,
                            betas=(0.9, 0.99))
    ckpt = os.path.join(args.out, "checkpoint")
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
    accelerator.print(f"LI-DiT {n_params / 1e6:.2f}M trainable parameters, context dims {context_dims}, "
                      f"mixed precision {accelerator.mixed_precision}{', compiled' if args.compile else ''}")

    loss_log = LossLog(os.path.join(args.out, "loss.csv"), step) if accelerator.is_main_process else None
    bar = tqdm(total=args.steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    t0, seen = time.time(), 0
    while step < args.steps:
        x0, idx = data.sample(args.batch_size)
        batch_captions = [data.captions[i] if random.random() >= args.caption_dropout else "" for i in idx]
        host_captions = [c if random.random() >= args.host_text_dropout else "" for c in batch_captions] \
            if args.host_text_dropout else None
        hidden = batch_inputs(batch_captions, host_captions)
        try:
            loss = train_step(model, opt, accelerator, x0, [h for h, _ in hidden], [m for _, m in hidden],
                              lr_at(step, args))
        except DivergedError as e:
            raise diverged(step + 1, e, "Lower --lr, or train in fp32 (--precision fp32): on CPU, adapter-only runs "
                           "(--base) under bf16 autocast with --compile give NaN gradients from the first step "
                           "(eager bf16 and compiled fp32 do not).") from None
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), raw.parameters()):
                pe.lerp_(p, 1 - args.ema)
        step += 1
        seen += args.batch_size * accelerator.num_processes
        rate = seen / (time.time() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", sps=f"{rate:.1f}")
        acc = ""
        save_now = step % args.save_every == 0 or step == args.steps
        if save_now and accelerator.is_main_process and args.data == "shapes" and args.eval_samples:
            acc = f"{evaluate(ema, batch_inputs, args, accelerator.device, args.eval_samples):.3f}"
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

    if accelerator.is_main_process and args.base:
        export = ema if args.export_weights == "ema" else raw
        save_host_adapter(os.path.join(args.out, f"{args.name}.safetensors"), host_adapter_of(export), "lidit",
                          settings[-1]["llm"], extra={"encoder": {k: v for k, v in settings[-1].items() if k != "type"},
                                                      "base": os.path.basename(args.base), "training": vars(args)})
        accelerator.print(f"wrote {args.out}/{args.name}.safetensors")
    elif accelerator.is_main_process:
        export = ema if args.export_weights == "ema" else raw
        text_encoders = []
        for i, (s, use_adapter) in enumerate(zip(settings, raw.has_adapter)):
            entry = dict(s)
            if s["type"] == "learned":
                entry["encoder"] = f"{args.name}-text-encoder.safetensors"
                save_word_encoder(os.path.join(args.out, entry["encoder"]), export.adapters[i])
            else:
                entry["adapter"] = f"{args.name}-adapter{'' if i == 0 else i}.safetensors" if use_adapter else None
                if use_adapter:
                    save_adapter(os.path.join(args.out, entry["adapter"]), export.adapters[i], s["llm"],
                                 extra={"encoder": {k: v for k, v in s.items() if k != "type"}})
            text_encoders.append(entry)
        save_lidit(os.path.join(args.out, f"{args.name}.safetensors"), export.lidit, text_encoders,
                   extra={"latent": "pixel_space", "resolution": args.resolution, "training": vars(args)})
        accelerator.print(f"wrote {args.out}/{args.name}.safetensors")


if __name__ == "__main__":
    main()

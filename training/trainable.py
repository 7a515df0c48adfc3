"""What train_lidit.py trains, as a library: a LI-DiT over its text streams (LLM features through LLM Diff Adapters,
or the no-LLM word encoder), or, for --base, a frozen LI-DiT with a new adapter and second cross-attentions; built,
started from a trained file (--init), checked during training and exported."""
from __future__ import annotations

import os
import random

import torch

from adapters.checkpoint import (load_adapter, load_lidit, load_word_encoder, save_adapter, save_host_adapter,
                                 save_lidit, save_word_encoder)
from adapters.conditioning import hidden_states_to_context
from adapters.diff_adapter import AdaptedLIDiT, HostAdapter, LLMDiffAdapter, lidit_sites
from adapters.lidit import (LIDiT, LIDiTConfig, flow_matching_loss, sample_euler, scores_attention,
                            set_attention_kernel)
from adapters.word_encoder import UNK, WordEncoder, build_vocabulary, copy_known_words
from dataset import captions, shapes_world
from dataset.features import caption_features, collate, encoder_settings, settings_of
from training.ship import find_adapter


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


def new_text_streams(args, all_captions: list[str], train_captions: list[str], accelerator):
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
    """The frozen text streams of a --base model, as new_text_streams gives them: its learned word encoder or its
    LLM(s) (looked up beside --llm) through its own adapters, all frozen; their files next to the model or where
    training.ship puts them."""
    streams = []
    for entry in base_info["text_encoders"]:
        if entry.get("type") == "learned":
            encoder, _ = load_word_encoder(find_adapter(entry["encoder"], base_path))
            streams.append((encoder.tokenize, encoder.requires_grad_(False), encoder.dim, entry))
            continue
        llm = os.path.join(os.path.dirname(os.path.abspath(args.llm[0])), entry["llm"])
        settings = settings_of(entry)
        with accelerator.main_process_first():
            feats, _ = caption_features(llm, all_captions, settings, args.cache_dir or os.path.join(args.out, "cache"))
        adapter = load_adapter(find_adapter(entry["adapter"], base_path))[0].requires_grad_(False) \
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


def progress_scenes(num: int) -> list[shapes_world.Scene]:
    """The trainer's progress check: single objects in combinations training never shows, in seen wordings."""
    rng = random.Random(1234)
    return [captions.generate(rng, "single", "seen", "unseen") for _ in range(num)]


@torch.no_grad()
def progress_check(model: Trainable, batch_inputs, args, device, num: int) -> float:
    """Held-out single-object prompts (progress_scenes), Euler 20 steps, CFG 3: share the checker passes."""
    scenes = progress_scenes(num)
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


def build_model(args, streams, base) -> Trainable:
    """A new LI-DiT over the text streams or, for --base, the frozen base with a new LLM Diff Adapter and its second
    cross-attentions (the last stream's)."""
    adapters = [encoder for _, encoder, _, _ in streams]
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
                             depth=args.depth, num_heads=args.num_heads,
                             context_dims=tuple(dim for _, _, dim, _ in streams), refiner_depth=args.refiner_depth,
                             refiner_causal=args.refiner_causal, fusion=args.fusion,
                             pos_kernel_size=args.pos_kernel_size, pos_embed=args.pos_embed)
        model = Trainable(LIDiT(config), adapters)
    set_attention_kernel(model, scores_attention)  # the same function as SDPA's; faster here (its docstring)
    return model


# a text stream's entry in a model file, less what names its files and what a fine-tune may change
FILE_KEYS = ("adapter", "encoder", "vocabulary_size")


def init_from(path: str, model: Trainable, settings: list[dict]) -> str:
    """Loads a trained LI-DiT file and its text encoders into a new run's model (--init). The run's text streams
    must be the file's: the same LLMs with the same encoder settings, else the adapters would read other states. A
    word encoder's vocabulary may have grown (new captions): the words it knew keep their embeddings. Returns what
    was loaded, in words."""
    lidit, info = load_lidit(path)
    entries = info.get("text_encoders", [])
    same = [{k: v for k, v in e.items() if k not in FILE_KEYS} for e in entries] == \
        [{k: v for k, v in s.items() if k not in FILE_KEYS} for s in settings]
    if lidit.config != model.lidit.config or not same:
        raise SystemExit(f"--init {path}: its model or text encoders differ from this run's (model {lidit.config} "
                         f"against {model.lidit.config}; encoders {entries} against {settings}). Give the flags "
                         "that trained it (its metadata's 'training'), or drop --init.")
    model.lidit.load_state_dict(lidit.state_dict())
    loaded = [os.path.basename(path)]
    for target, entry in zip(model.adapters, entries):
        if entry.get("adapter"):
            target.load_state_dict(load_adapter(find_adapter(entry["adapter"], path))[0].state_dict())
            loaded.append(entry["adapter"])
        elif entry.get("type") == "learned":
            known = copy_known_words(load_word_encoder(find_adapter(entry["encoder"], path))[0], target)
            loaded.append(f"{entry['encoder']} ({known} of the run's {len(target.vocabulary)} words)")
    return ", ".join(loaded)


def unknown_words(ids: torch.Tensor, encoder: WordEncoder, share: float, samples: float = 1.0) -> torch.Tensor:
    """--host-word-dropout: token ids [B, T] of a base model's word encoder with each word (not <pad>) replaced by
    <unk> with probability `share`, in a share `samples` of the rows (the others keep every word). Drawn from
    `random`, as the other per-sample choices, so that a resumed run draws what an uninterrupted one would; with
    `samples` 1 no row draw is made, so runs without it draw as before."""
    rows = [samples >= 1 or random.random() < samples for _ in range(ids.shape[0])]
    drop = torch.tensor([[row_drops and random.random() < share for _ in row]
                         for row_drops, row in zip(rows, ids.tolist())], dtype=torch.bool)
    return ids.masked_fill(drop.reshape(ids.shape) & (ids != 0), encoder.index[UNK])


def export(args, raw, ema, settings: list[dict]) -> str:
    """<out>/<name>.safetensors (the EMA or raw weights): an LI-DiT with its text encoders and adapters beside it,
    or, for --base, the adapter-only file. Returns its path."""
    export = ema if args.export_weights == "ema" else raw
    path = os.path.join(args.out, f"{args.name}.safetensors")
    if args.base:
        save_host_adapter(path, host_adapter_of(export), "lidit", settings[-1]["llm"],
                          extra={"encoder": {k: v for k, v in settings[-1].items() if k != "type"},
                                 "base": os.path.basename(args.base), "training": vars(args)})
        return path
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
    save_lidit(path, export.lidit, text_encoders,
               extra={"latent": "pixel_space", "resolution": args.resolution, "training": vars(args)})
    return path

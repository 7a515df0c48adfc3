"""Do prompt weights do what an artist expects? Measured in the shapes world on an LLM-conditioned LI-DiT.

    python -m evaluation.prompt_weights                    # the default model, 4 images per prompt
    python -m evaluation.prompt_weights --json out/weights.json --images-per-prompt 2

Two experiments, image k of every prompt from the same noise in every condition:

  colour   "a (red:w) circle in the center": one object of each colour and shape, in the canonical caption
           language (the words the model knows best). Colour right = an object of the
           asked colour is drawn. At w = 0 it should fall to chance (1 / the number of colours); at w = 1 it is
           the unweighted prompt.
  objects  "a scarlet circle at the top and a (cobalt block:w) on the left": the two-object validation prompts of
           the unseen-wording columns, where the model misses more often, the weight on the first or the second
           object's colour and outline words. Each object is checked on its own (colour, outline, place); a weight
           above 1 should raise the weighted object's share of correct images.

The prompts are encoded by LLM Prompt Encode's code path (adapters.llm_encoder.encode_prompts, weighted=True).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys

import torch

from adapters.checkpoint import load_adapter, load_lidit
from adapters.conditioning import hidden_states_to_context
from adapters.lidit import sample_euler
from dataset import captions as caption_language
from dataset import features, shapes_world
from dataset.features import collate
from dataset.shapes_world import Scene
from training.ship import find_adapter, find_llm
from evaluation.evaluate import DEFAULT_MODEL, alone, caption_states, prompt_sets

COLOUR_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
OBJECT_WEIGHTS = (1.5, 2.0)  # and the unweighted prompt


def mention_span(caption: str, mention, after: int = 0) -> tuple[int, int]:
    """(start, end) of the first words at or after `after` that say the mention's colour and outline, in any
    wording of the caption language ("crimson discs", "grass green round shape")."""
    colours = sorted(caption_language.COLOR_WORDS[mention.color], key=len, reverse=True)
    shapes = sorted((w for pair in caption_language.SHAPE_WORDS[mention.shape] for w in pair), key=len, reverse=True)
    pattern = rf"\b({'|'.join(map(re.escape, colours))}) ({'|'.join(map(re.escape, shapes))})\b"
    found = re.compile(pattern).search(caption, after)
    if found is None:
        raise ValueError(f"no words for {mention} in {caption!r}")
    return found.span()


def weigh(caption: str, span: tuple[int, int], weight: float) -> str:
    """The caption with the characters of `span` written as (words:weight)."""
    start, end = span
    return f"{caption[:start]}({caption[start:end]}:{weight:g}){caption[end:]}"


def colour_prompts(seed: int) -> list[tuple[Scene, str]]:
    """One single-object scene of every colour and outline (canonical caption), and its colour word."""
    rng, out = random.Random(seed), []
    for color in shapes_world.COLORS:
        for shape in shapes_world.SHAPES:
            for _ in range(10_000):
                scene = caption_language.generate(rng, "single", language="canonical")
                m = scene.mentions[0]
                if (m.color, m.shape) == (color, shape):
                    out.append((scene, caption_language.COLOR_WORDS[color][0]))  # canonical: one word each
                    break
    return out


def pair_prompts(per_kind: int, seed: int) -> list[Scene]:
    """The two-object validation prompts (pair and relation kinds) of the unseen-wording columns, where the default
    model misses often enough for a weight to have room."""
    sets = prompt_sets(per_kind, seed, "validation")
    return [s for column in ("unseen wording", "both unseen") for s in sets[column]
            if s.kind in ("pair", "relation") and len(s.mentions) == 2]


def weighted_pair(scene: Scene, which: int, weight: float) -> str:
    first = mention_span(scene.caption, scene.mentions[0])
    span = first if which == 0 else mention_span(scene.caption, scene.mentions[1], first[1])
    return weigh(scene.caption, span, weight)


class Sampler:
    """The model with its LLM stream, sampling captions read with prompt weights."""

    def __init__(self, model_path: str, device: torch.device, llm_dirs: list[str] | None):
        self.model, info = load_lidit(model_path)
        self.model.eval().requires_grad_(False).to(device)
        entries = info["text_encoders"]
        if len(entries) != 1 or entries[0].get("type") == "learned":
            raise ValueError(f"'{model_path}' is not conditioned on one LLM; prompt weights act on an LLM's states.")
        self.settings = {**features.settings_of(entries[0]), "weighted": True}
        self.llm_path = find_llm(self.settings["llm"], llm_dirs)
        self.adapter, _ = load_adapter(find_adapter(entries[0]["adapter"], model_path))
        self.adapter.eval().requires_grad_(False).to(device)
        self.resolution, self.device = int(info.get("resolution", 32)), device

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        feats, _ = caption_states(self.llm_path, self.settings, list(dict.fromkeys(captions + [""])), self.device)
        return feats

    @torch.no_grad()
    def sample(self, captions: list[str], images: int, steps: int, cfg: float, seed: int, batch_size: int):
        feats = self.encode(captions)

        def context(batch):
            hidden, mask = collate([feats[c] for c in batch])
            mask = mask.to(self.device)
            return [hidden_states_to_context(hidden.to(self.device), self.adapter, mask)], [mask]

        noise = [torch.randn(3, self.resolution, self.resolution, generator=torch.Generator().manual_seed(seed + k))
                 for k in range(images)]
        jobs = [(c, k) for c in captions for k in range(images)]
        out = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            ctx, masks = context([c for c, _ in chunk])
            uctx, umasks = context([""] * len(chunk))
            x = torch.stack([noise[k] for _, k in chunk]).to(self.device)
            x = sample_euler(self.model, x, ctx, masks, steps=steps, cfg=cfg, uncond_contexts=uctx,
                             uncond_masks=umasks)
            out += list(((x.float().cpu() + 1) / 2).clamp(0, 1))
        return out


def share(values: list[bool]) -> float:
    return sum(values) / len(values)


def run(model_path: str = DEFAULT_MODEL, *, images: int = 4, pairs: int = 12, steps: int = 20, cfg: float = 3.0,
        seed: int = 0, device: str | None = None, batch_size: int = 64, llm_dirs: list[str] | None = None,
        log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sampler = Sampler(model_path, device, llm_dirs)
    result = {"model": model_path, "images_per_prompt": images, "steps": steps, "cfg": cfg, "seed": seed,
              "chance": 1 / len(shapes_world.COLORS), "colour": {}, "objects": {}}

    singles = colour_prompts(seed)
    for w in COLOUR_WEIGHTS:
        captions = [weigh(s.caption, re.search(rf"\b{word}\b", s.caption).span(), w) if w != 1.0 else s.caption
                    for s, word in singles]
        imgs = sampler.sample(captions, images, steps, cfg, seed, batch_size)
        checks = [shapes_world.check(img, s) for (s, _), img in zip([x for x in singles for _ in range(images)],
                                                                    imgs)]
        result["colour"][f"{w:g}"] = {"colour right": share([c["color"] for c in checks]),
                                      "outline right": share([c["shape"] for c in checks]), "images": len(checks),
                                      "example": captions[0]}
        log(f"colour weight {w:g}: colour right {result['colour'][f'{w:g}']['colour right']:.3f}")

    scenes = pair_prompts(pairs, seed)
    repeated = [s for s in scenes for _ in range(images)]
    conditions = [("none", None, 1.0)] + [(f"{name} x{w:g}", which, w) for which, name in enumerate(("first",
                                                                                                   "second"))
                                          for w in OBJECT_WEIGHTS]
    for label, which, w in conditions:
        captions = [s.caption if which is None else weighted_pair(s, which, w) for s in scenes]
        imgs = sampler.sample(captions, images, steps, cfg, seed, batch_size)
        first = [shapes_world.check(img, alone(s, 0))["overall"] for s, img in zip(repeated, imgs)]
        second = [shapes_world.check(img, alone(s, 1))["overall"] for s, img in zip(repeated, imgs)]
        both = [shapes_world.check(img, s)["overall"] for s, img in zip(repeated, imgs)]
        row = {"first right": share(first), "second right": share(second), "both right": share(both),
               "images": len(imgs), "example": captions[0]}
        result["objects"][label] = row
        log(f"weighted object {label}: first {row['first right']:.3f}, second {row['second right']:.3f}")
    return result


def format_tables(result: dict) -> str:
    lines = [f"colour word weighted (chance {100 * result['chance']:.1f} %)", "",
             "| weight on the colour word | colour right % | outline right % | images |", "|---:|---:|---:|---:|"]
    lines += [f"| {w} | {100 * r['colour right']:.1f} | {100 * r['outline right']:.1f} | {r['images']} |"
              for w, r in result["colour"].items()]
    lines += ["", "| weighted object x weight | first object right % | second object right % | both % | images |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {100 * r['first right']:.1f} | {100 * r['second right']:.1f} | {100 * r['both right']:.1f} "
              f"| {r['images']} |" for k, r in result["objects"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="LI-DiT .safetensors conditioned on one LLM")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--pairs", type=int, default=12,
                   help="two-object prompts of each kind (pair, relation) in each unseen-wording column")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.model, images=args.images_per_prompt, pairs=args.pairs, steps=args.steps, cfg=args.cfg,
                 seed=args.seed, device=args.device)
    print(format_tables(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

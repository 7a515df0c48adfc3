"""Small-scale ablations of the papers' claims, all with the same trainer, data, budget and seed, evaluated by
evaluation/evaluate.py on held-out prompts. Prints one markdown table; writes each run's held-out image grid
(<out>/<run>/heldout.png) and, with --docs, a side-by-side grid of all runs and their loss curves.

    .venv/bin/python -m evaluation.ablations --out runs/ablations --docs docs/images

A stopped sweep resumes where it stopped: finished models and evaluations are reused.

Each row changes one thing against the row it builds on (see ABLATIONS); "no-llm" is the baseline without an LLM
(word embeddings learned from scratch, the same refiner), "gemma3" Gemma-3-270M alone. The budget is small, so
differences of a few points are within noise: read the table with that in mind. Accuracy and held-out loss come
in the four columns of evaluation/evaluate.py (seen wording + seen combination, unseen combination, unseen wording,
both unseen).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from evaluation import evaluate as ev
from evaluation.plots import loss_svg, read_loss
from training import train_lidit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOLLM2 = os.path.join(ROOT, ".comfyui", "models", "LLM", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = os.path.join(ROOT, ".cache", "gemma-3-270m.Q4_K_M.gguf")

SMOL = ["--llm", SMOLLM2]
# adapter-only runs: argparse keeps the last of a repeated flag, so a row's own --llm-gate or --host-text-dropout wins
PAPER_ADAPTER = ["--layers", "all", "--instruction", "li-dit", "--llm-gate", "0", "--host-text-dropout", "0"]
# name -> (what it tests, trainer flags)
ABLATIONS = {
    "no-llm": ("no LLM: word embeddings learned from scratch over the training vocabulary + refiner",
               ["--text-encoder", "learned", "--refiner-depth", "2"]),
    "last-layer": ("last hidden layer only, no instruction, no refiner",
                   [*SMOL, "--layers", "last", "--instruction", "none", "--refiner-depth", "0"]),
    "layer-3": ("third-to-last layer (LI-DiT), no instruction, no refiner",
                [*SMOL, "--layers", "-3", "--instruction", "none", "--refiner-depth", "0"]),
    "all-blocks": ("all blocks through the LLM Diff Adapter, no instruction, no refiner",
                   [*SMOL, "--layers", "all", "--instruction", "none", "--refiner-depth", "0"]),
    "+refiner": ("all blocks + token refiner (2 bidirectional blocks)",
                 [*SMOL, "--layers", "all", "--instruction", "none", "--refiner-depth", "2"]),
    "+instruction": ("all blocks + refiner + LI-DiT instruction (the default model's recipe)",
                     [*SMOL, "--layers", "all", "--instruction", "li-dit", "--refiner-depth", "2"]),
    "causal-refiner": ("as +instruction, but the refiner keeps the causal mask",
                       [*SMOL, "--layers", "all", "--instruction", "li-dit", "--refiner-depth", "2",
                        "--refiner-causal"]),
    "gemma3": ("Gemma-3-270M alone, as +instruction",
               ["--llm", GEMMA3, "--layers", "all", "--instruction", "li-dit", "--refiner-depth", "2"]),
    "2llm-collab": ("SmolLM2 + Gemma-3-270M, collaborative refiner",
                    [*SMOL, "--llm", GEMMA3, "--layers", "all", "--instruction", "li-dit", "--refiner-depth", "2",
                     "--fusion", "collaborative"]),
    "2llm-concat": ("SmolLM2 + Gemma-3-270M, plain concatenation",
                    [*SMOL, "--llm", GEMMA3, "--layers", "all", "--instruction", "li-dit", "--refiner-depth", "2",
                     "--fusion", "concat"]),
    # The LLM Diff Adapter on an existing model: "no-llm" frozen, only the adapter and the second
    # cross-attention trained (BASE_OF names the frozen run; its model file is <out>/<base>/<base>.safetensors).
    "no-llm+adapter": ("no-llm frozen + LLM Diff Adapter on SmolLM2 (adapter-only; gates on both branches; the "
                       "paper's recipe: the new gate closed, the base's own text always given)",
                       [*SMOL, *PAPER_ADAPTER]),
    "no-llm+adapter-fixed-host-gate": ("as no-llm+adapter, the base branch's gate kept at 1 (new branch gated only)",
                                       [*SMOL, *PAPER_ADAPTER, "--host-gate", "fixed"]),
    "no-llm+adapter-contributions": ("as no-llm+adapter, each block's state replaced by its contribution (state in "
                                     "context minus the same token's state in a one-token prompt)",
                                     [*SMOL, *PAPER_ADAPTER, "--block-outputs", "contributions"]),
    "no-llm+adapter-open-gate": ("as no-llm+adapter, the new gate open at the start with its value projection at "
                                 "zero (--llm-gate 1)",
                                 [*SMOL, *PAPER_ADAPTER, "--llm-gate", "1"]),
    "no-llm+adapter-host-dropout": ("as no-llm+adapter, the base's own text empty for half of the samples "
                                    "(--host-text-dropout 0.5)",
                                    [*SMOL, *PAPER_ADAPTER, "--host-text-dropout", "0.5"]),
    "no-llm+adapter-open-gate+host-dropout": ("both (--llm-gate 1 --host-text-dropout 0.5)",
                                              [*SMOL, *PAPER_ADAPTER, "--llm-gate", "1", "--host-text-dropout",
                                               "0.5"]),
    # a base that reads only the canonical caption language, the adapter the full one
    "canonical": ("as no-llm, trained on the canonical captions only (one phrasing per scene, --captions "
                  "canonical)", ["--text-encoder", "learned", "--refiner-depth", "2", "--captions", "canonical"]),
    "canonical+adapter": ("canonical frozen + LLM Diff Adapter trained on the full caption language, the paper's "
                          "recipe", [*SMOL, *PAPER_ADAPTER]),
    "canonical+adapter-open-gate+host-dropout": ("as canonical+adapter, --llm-gate 1 --host-text-dropout 0.5",
                                                 [*SMOL, *PAPER_ADAPTER, "--llm-gate", "1", "--host-text-dropout",
                                                  "0.5"]),
}
BASE_OF = {name: name.split("+")[0] for name in ABLATIONS if "+" in name and name.split("+")[0] in ABLATIONS}

BUDGET = ["--hidden-size", "96", "--depth", "4", "--num-heads", "4", "--patch-size", "4", "--batch-size", "32",
          "--lr", "1e-3", "--warmup", "50", "--ema", "0.99", "--eval-samples", "0", "--pool-size", "2000"]


def suffix(args) -> str:
    """Of a run's evaluation files: none for the test prompts, "-validation" for the validation prompts."""
    return "" if args.prompt_split == "test" else f"-{args.prompt_split}"


def run(name: str, args, feature_cache: dict) -> dict:
    out = os.path.join(args.out, name)
    model = os.path.join(out, f"{name}.safetensors")
    flags = ABLATIONS[name][1]
    base = os.path.join(args.out, BASE_OF[name], f"{BASE_OF[name]}.safetensors") if name in BASE_OF else None
    if base:
        flags = [*flags, "--base", base]
    if not os.path.exists(model):
        train_lidit.main([*flags, *BUDGET, "--steps", str(args.steps), "--save-every",
                          str(args.steps), "--seed", str(args.seed), "--out", out, "--name", name,
                          "--cache-dir", args.cache_dir, "--threads", str(args.threads), "--resume"])
    grid = os.path.join(out, f"heldout{suffix(args)}.png")
    scores = os.path.join(out, f"eval{suffix(args)}.json")
    # an interrupted sweep picks up where it stopped: a run's evaluation is reused while its model is unchanged
    if os.path.exists(scores) and os.path.getmtime(scores) > os.path.getmtime(model) and os.path.exists(grid):
        with open(scores) as f:
            result = json.load(f)
        if "heldout_loss" in result and "splits" in result:  # else a file without these columns: run again
            return result
    return ev.evaluate(base or model, diff_adapter=model if base else None, per_kind=args.per_kind,
                       images_per_prompt=args.images_per_prompt, seed=args.seed, cache_dir=args.cache_dir,
                       feature_cache=feature_cache, save_grid=grid, json_path=scores, prompt_split=args.prompt_split)


def table(results: dict) -> str:
    """Per run, in the four columns (seen / unseen combination / unseen wording / both unseen): the held-out loss
    with the caption and its text gain, the share of images that pass every criterion, and the share with an
    object of every asked colour; last, the positional-bias test over all two-object prompts."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    cols = " / ".join(ev.SPLITS)
    lines = [f"| run | what changes | held-out loss, text gain % ({cols}) | accuracy ({cols}) | mean | "
             f"colour right ({cols}) | 1st vs 2nd object |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        hl, sp = r["heldout_loss"], r["splits"]
        bias = r["positional_bias"].get("all two-object")
        gap = f"{pct(bias['first'])} / {pct(bias['second'])}" if bias else "-"
        losses = " / ".join(f"{hl[c]['conditional']:.4f} ({pct(hl[c]['text_gain'])})" for c in ev.SPLITS)
        accuracy = " / ".join(pct(sp[c]["overall"]) for c in ev.SPLITS)
        colour = " / ".join(pct(sp[c]["color"]) for c in ev.SPLITS)
        lines.append(f"| {name} | {ABLATIONS[name][0]} | {losses} | {accuracy} | **{pct(r['overall_mean'])}** | "
                     f"{colour} | {gap} |")
    return "\n".join(lines)


# held-out prompts shown side by side for every run: indices into the prompt order of evaluate's grids
# (column, kind) -> the indices of its prompts (evaluate.prompt_sets order) to show
COMPARISON_PROMPTS = {("seen", "relation"): (0,), ("unseen combination", "single"): (0, 1),
                      ("unseen combination", "count"): (0,), ("unseen wording", "single"): (0,),
                      ("unseen wording", "relation"): (0,), ("both unseen", "pair"): (0,),
                      ("both unseen", "triple"): (0,)}


# the unseen-wording grid: the first two prompts of every kind in that column
UNSEEN_WORDING_PROMPTS = {("unseen wording", kind): (0, 1) for kind in ev.KINDS}


def comparison_grid(args, names: list[str], path: str, picks: dict = COMPARISON_PROMPTS) -> None:
    """One row per run, one column per prompt of `picks` (first image of each), labelled; the prompts go to a
    same-name .txt file."""
    from PIL import Image, ImageDraw

    with open(os.path.join(args.out, names[0], f"heldout{suffix(args)}.txt")) as f:
        prompts = [line.rstrip("\n").split("\t") for line in f]
    first_of = {}
    for i, (split, kind, _) in enumerate(prompts):
        first_of.setdefault((split, kind), i)
    picked = [first_of[key] + j for key, js in picks.items() for j in js]
    label_w, cell, pad = max(120, 8 + 6 * max(len(n) for n in names)), ev.GRID_CELL, 4  # PIL's default font: 6 px
    sheet = Image.new("RGB", (label_w + len(picked) * (cell + pad), 16 + len(names) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for col in range(len(picked)):
        draw.text((label_w + col * (cell + pad) + cell // 2 - 3, 2), str(col + 1), fill="black")
    for row, name in enumerate(names):
        grid = Image.open(os.path.join(args.out, name, f"heldout{suffix(args)}.png")).convert("RGB")
        y = 16 + row * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill="black")
        for col, i in enumerate(picked):
            sheet.paste(ev.grid_cell(grid, i * args.images_per_prompt, args.images_per_prompt),
                        (label_w + col * (cell + pad), y))
    sheet.save(path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("".join(f"{col + 1}\t" + "\t".join(prompts[i]) + "\n" for col, i in enumerate(picked)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablations"))
    p.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "cache"))
    p.add_argument("--docs", default=None, help="write the comparison grids and the loss curves (SVG) here")
    p.add_argument("--docs-prefix", default="", help="prefix of the file names written to --docs")
    p.add_argument("--only", nargs="*", default=None, help="run these ablations only")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-kind", type=int, default=8, help="evaluation prompts of each kind in each column")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--prompt-split", default="test", choices=ev.PROMPT_SPLITS,
                   help="'validation' to choose between runs, 'test' for the reported numbers")
    args = p.parse_args(argv)
    if args.docs:
        os.makedirs(args.docs, exist_ok=True)
    names = args.only or list(ABLATIONS)
    feature_cache, results = {}, {}
    started = time.time()
    for name in names:
        results[name] = run(name, args, feature_cache)
        print(f"[{time.time() - started:.0f}s] {name}: overall {results[name]['overall_mean']:.3f}", flush=True)
    print(table(results))
    with open(os.path.join(args.out, f"{args.docs_prefix}ablations{suffix(args)}.json"), "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in results.items()}, f, indent=1)
    if args.docs:
        comparison_grid(args, names, os.path.join(args.docs, f"{args.docs_prefix}ablation-grid.png"))
        comparison_grid(args, names, os.path.join(args.docs, f"{args.docs_prefix}unseen-wording-grid.png"),
                        UNSEEN_WORDING_PROMPTS)
        curves = {n: read_loss(os.path.join(args.out, n, "loss.csv")) for n in names}
        with open(os.path.join(args.docs, f"{args.docs_prefix}ablation-loss.svg"), "w") as f:
            f.write(loss_svg(curves, "Ablations: flow-matching loss (moving average of 25 steps, log scale)",
                             log_y=True))


if __name__ == "__main__":
    main()

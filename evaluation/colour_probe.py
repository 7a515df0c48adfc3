"""How much an LLM knows about colour words, before any diffusion model is trained on it: a linear probe.

For every colour a caption can ask for beyond the seven (dataset/captions.py), the caption "a <name> circle" (or,
for a thing, "a circle the color of <thing>") is encoded as the trainer encodes captions (dataset/features.py:
instruction, chat template, every hidden state). Per block, the caption's states are pooled (mean over its tokens,
or its last token, which a causal LLM has let read the whole colour) and a ridge regression maps them to the
colour in CIELAB. It is fitted on the seen names and things only (captions.SEEN_OPEN_COLORS, what training captions
say) and scored by the median CIE76 dE on the held-out ones, split as the evaluation splits them
(evaluate.held_out_half): the block, pooling and ridge strength are chosen on the validation colours and reported
on the test colours.

A diffusion model conditioned on these states can at best turn them into colour as well as such a probe reads
them: a probe that cannot place held-out names within dE 20 says the LLM does not carry what the target asks.

    .venv/bin/python -m evaluation.colour_probe --llm .comfyui/models/LLM/SmolLM2-135M-Instruct.Q4_1.gguf \
        --llm .cache/gemma-3-270m.Q4_K_M.gguf --cache-dir runs/cache
"""
from __future__ import annotations

import argparse
import statistics

import torch

from dataset import captions, colour_names
from dataset.features import caption_features, encoder_settings
from dataset.shapes_world import PALETTE
from evaluation.evaluate import held_out_half

RIDGE = (0.1, 1.0, 10.0, 100.0, 1000.0)  # strengths tried (times the number of samples), chosen on validation
POOLINGS = ("mean", "last")


def probe_caption(key: str, described: bool) -> str:
    return f"a circle {captions.DESCRIPTION.format(captions.THINGS[key])}" if described else f"a {key} circle"


def pooled(features: torch.Tensor, pooling: str) -> torch.Tensor:  # [S, T, D] -> [S, D]
    return features.float().mean(1) if pooling == "mean" else features[:, -1].float()


def ridge_fit(x: torch.Tensor, y: torch.Tensor, strength: float):
    """Closed-form ridge regression on standardised inputs; returns a function x -> y."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1).double()
    eye = torch.eye(xs.shape[1], dtype=torch.float64)
    eye[-1, -1] = 0  # the intercept is not shrunk
    w = torch.linalg.solve(xs.T @ xs + strength * len(x) * eye, xs.T @ y.double())
    return lambda z: (torch.cat([(z - mean) / std, torch.ones(len(z), 1)], 1).double() @ w).float()


def colour_sets() -> dict[str, list[tuple[str, bool]]]:
    """(key, described) per set: what training says, and the held-out names and things of each prompt split."""
    seen = [(k, False) for k in captions.SEEN_OPEN_COLORS.names] + [(k, True) for k in captions.SEEN_OPEN_COLORS.things]
    sets = {"train": seen}
    for split in ("validation", "test"):
        for column, described in (("held-out names", False), ("held-out descriptions", True)):
            sets[f"{split} {column}"] = [(k, described) for k in held_out_half(captions.COLOR_COLUMNS[column], split)
                                         .names + held_out_half(captions.COLOR_COLUMNS[column], split).things]
    return sets


def probe(llm_path: str, cache_dir: str, max_tokens: int = 64) -> dict:
    sets = colour_sets()
    items = list(dict.fromkeys(item for v in sets.values() for item in v))
    texts = [probe_caption(k, d) for k, d in items]
    settings = encoder_settings(llm_path, "all", "li-dit", max_tokens)
    feats, num_states = caption_features(llm_path, texts, settings, cache_dir)
    by_item = dict(zip(items, feats))
    lab = {k: colour_names.srgb_to_lab(torch.tensor(PALETTE[k])) for k, _ in items}

    def errors(fit, block, pooling, name):
        x = torch.stack([pooled(by_item[i], pooling)[block] for i in sets[name]])
        y = torch.stack([lab[k] for k, _ in sets[name]])
        return (fit(x) - y).norm(dim=-1).tolist()

    y_train = torch.stack([lab[k] for k, _ in sets["train"]])
    rows = []
    for pooling in POOLINGS:
        x_pooled = torch.stack([pooled(by_item[i], pooling) for i in sets["train"]])  # [N, S, D]
        for block in range(num_states):
            for strength in RIDGE:
                fit = ridge_fit(x_pooled[:, block], y_train, strength)
                rows.append({"pooling": pooling, "block": block, "ridge": strength,
                             **{name: statistics.median(errors(fit, block, pooling, name)) for name in sets
                                if name != "train"},
                             "train": statistics.median(errors(fit, block, pooling, "train"))})
    best = min(rows, key=lambda r: r["validation held-out names"])
    best_described = min(rows, key=lambda r: r["validation held-out descriptions"])
    return {"llm": llm_path, "num_states": num_states, "sets": {k: len(v) for k, v in sets.items()},
            "chosen_for_names": best, "chosen_for_descriptions": best_described, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", action="append", required=True, help="LLM file or folder; repeat to compare")
    p.add_argument("--cache-dir", default="runs/cache", help="the trainer's LLM feature cache")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = ["| LLM | chosen on validation: block, pooling, ridge | held-out names, median dE: validation / test | "
             "held-out descriptions (chosen on their validation): validation / test | seen (fit) |",
             "|---|---|---:|---:|---:|"]
    results = []
    for llm in args.llm:
        r = probe(llm, args.cache_dir)
        results.append(r)
        b, d = r["chosen_for_names"], r["chosen_for_descriptions"]
        lines.append(f"| {llm.rsplit('/', 1)[-1]} | "
                     f"{b['block']} of {r['num_states']}, {b['pooling']}, {b['ridge']:g} | "
                     f"{b['validation held-out names']:.1f} / {b['test held-out names']:.1f} | "
                     f"{d['validation held-out descriptions']:.1f} / {d['test held-out descriptions']:.1f} | "
                     f"{b['train']:.1f} |")
    print(f"sets: {results[0]['sets']}\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()

"""Held-out colours in the real ComfyUI server: the default workflow (an LI-DiT model trained with an LLM) above the
no-LLM baseline (workflows/lidit_shapes_adapter.json without the adapter: a model trained on word embeddings of its
own), on single-object test prompts whose colour no training caption names or describes. Every image is scored by
the CIE76 dE between the asked colour and the drawn one (dataset.shapes_world.color_errors).

    .venv/bin/python -m evaluation.colour_grid --out docs/images/colour-grid.png \\
        --model runs/colour12k/lidit-shapes-smollm2.safetensors \\
        --adapter runs/colour12k/lidit-shapes-smollm2-adapter.safetensors \\
        --baseline runs/colour12k-nollm/lidit-shapes-nollm.safetensors \\
        --baseline-text-encoder runs/colour12k-nollm/lidit-shapes-nollm-text-encoder.safetensors

Without --model and --adapter the shipped default model is used. Writes the grid (top: the asked colour, then one
row per model) and PATH.txt with the prompts and every dE, and prints each row's median.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from PIL import Image, ImageDraw

from dataset import shapes_world
from evaluation.evaluate import PROMPT_SPLITS, color_prompt_sets
from evaluation.server_images import load_api_workflow, sample, server_with_files, with_models, with_prompt
from scripts import comfy_client

CELL, LABEL = 96, 14
NEAR, SAME = 25.0, 10.0  # dE: a near hue, the same colour (the evaluation's thresholds)


def grid_scenes(names: int, descriptions: int, prompt_split: str) -> list[shapes_world.Scene]:
    """Single-object prompts, each in another colour: `names` held-out colour names, then `descriptions` held-out
    described colours."""
    sets = color_prompt_sets(4 * max(names, descriptions), 0, prompt_split)
    scenes = []
    for column, count in (("held-out names", names), ("held-out descriptions", descriptions)):
        chosen = {}
        for scene in (s for s in sets[column] if s.kind == "single"):
            if all(scene.mentions[0].color != s.mentions[0].color for s in scenes):
                chosen.setdefault(scene.mentions[0].color, scene)
        scenes += list(chosen.values())[:count]
    return scenes


def graphs(server: comfy_client.ComfyServer, args) -> dict[str, dict]:
    """Row label -> API graph: the default workflow with the LLM model, the adapter workflow's base alone with the
    baseline."""
    llm_files = {k: os.path.basename(v) for k, v in (("LIDiTLoader", args.model), ("LLMAdapterLoader", args.adapter))
                 if v}
    baseline = comfy_client.without_llm_adapter(load_api_workflow(server, "lidit_shapes_adapter.json"))
    return {"LLM (" + os.path.basename(args.model or "shipped default model") + ")":
                with_models(load_api_workflow(server, "lidit_shapes_default.json"), llm_files),
            "no LLM (" + os.path.basename(args.baseline) + ")":
                with_models(baseline, {"LIDiTLoader": os.path.basename(args.baseline),
                                       "LIDiTWordEncode": os.path.basename(args.baseline_text_encoder)})}


def frame(error: float | None) -> str:
    return "red" if error is None or error > NEAR else "yellow" if error > SAME else "lime"


def draw_grid(scenes, rows: dict[str, list], path: str) -> None:
    width = len(scenes) * CELL
    grid = Image.new("RGB", (width, CELL // 2 + LABEL + len(rows) * (LABEL + CELL)), "white")
    draw = ImageDraw.Draw(grid)
    for c, scene in enumerate(scenes):  # the asked colour, and its name
        asked = tuple(round(255 * v) for v in shapes_world.PALETTE[scene.mentions[0].color])
        draw.rectangle([c * CELL, 0, (c + 1) * CELL - 1, CELL // 2 - 1], fill=asked, outline="white")
        draw.text((c * CELL + 2, CELL // 2), scene.mentions[0].color[:16], fill="black")
    y = CELL // 2 + LABEL
    for label, cells in rows.items():
        draw.text((2, y), label, fill="black")
        y += LABEL
        for c, (image, error) in enumerate(cells):
            grid.paste(image.resize((CELL, CELL), Image.NEAREST), (c * CELL, y))
            draw.rectangle([c * CELL, y, (c + 1) * CELL - 1, y + CELL - 1], outline=frame(error), width=2)
            draw.text((c * CELL + 4, y + CELL - 12), "nothing" if error is None else f"dE {error:.0f}",
                      fill="white")
        y += CELL
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def median(errors: list[float | None]) -> float:
    """Median dE, an image with nothing drawn counting as the worst."""
    return statistics.median(float("inf") if e is None else e for e in errors)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the grid's PNG")
    p.add_argument("--model", help="LI-DiT file trained with an LLM (default: the shipped default model)")
    p.add_argument("--adapter", help="its LLM Diff Adapter file (default: the shipped default adapter)")
    p.add_argument("--baseline", required=True, help="LI-DiT file of the no-LLM baseline")
    p.add_argument("--baseline-text-encoder", required=True, help="the baseline's -text-encoder.safetensors")
    p.add_argument("--names", type=int, default=8, help="held-out colour names (columns)")
    p.add_argument("--descriptions", type=int, default=4, help="held-out described colours (columns)")
    p.add_argument("--prompt-split", default="test", choices=PROMPT_SPLITS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.model) != bool(args.adapter):
        p.error("--model and --adapter go together: a model trained with an LLM needs the adapter it was trained with")
    scenes = grid_scenes(args.names, args.descriptions, args.prompt_split)
    files = {"lidit": [f for f in (args.model, args.baseline) if f],
             "llm_adapters": [f for f in (args.adapter, args.baseline_text_encoder) if f]}
    rows = {}
    with tempfile.TemporaryDirectory() as output, server_with_files(output, files) as server:
        for label, graph in graphs(server, args).items():
            rows[label] = []
            for scene in scenes:
                image, pixels = sample(server, with_prompt(graph, scene.caption, args.seed))
                rows[label].append((image, shapes_world.color_errors(pixels, scene)[0]))
    draw_grid(scenes, rows, args.out)
    with open(args.out + ".txt", "w") as f:
        f.write(f"Held-out colours ({args.prompt_split} prompts), seed {args.seed}, in ComfyUI. Top: the asked colour. "
                f"Frame: green dE <= {SAME:.0f} (the same colour), yellow <= {NEAR:.0f} (a near hue), red: further "
                f"or nothing drawn.\n")
        for c, scene in enumerate(scenes, 1):
            errors = " / ".join("nothing" if e is None else f"{e:.1f}" for _, e in (r[c - 1] for r in rows.values()))
            f.write(f"column {c}: {scene.caption}  [dE {errors}]\n")
    for label, cells in rows.items():
        print(f"{label}: median dE {median([e for _, e in cells]):.1f} over {len(cells)} images")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

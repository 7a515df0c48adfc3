"""Before and after the LLM Diff Adapter, in the real ComfyUI server: workflows/lidit_shapes_adapter.json run on
prompts of one evaluation column as shipped (after) and without Apply LLM Diff Adapter and LLM Conditioning Attach
(before: the base model alone), each image scored by the shapes-world checker (every criterion, and colour
alone).

    .venv/bin/python -m evaluation.adapter_grid --out docs/images/adapter-workflow-grid.png

Writes the grid (one row per prompt: before, after) and PATH.txt with the prompts and the checker's verdicts, and
prints how many images pass on each side.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from PIL import Image, ImageDraw

from dataset import shapes_world
from evaluation.evaluate import KINDS, PROMPT_SPLITS, SPLITS, prompt_sets
from evaluation.server_images import PROMPT_NODES, load_api_workflow, sample, with_prompt
from scripts import comfy_client

WORKFLOW = "lidit_shapes_adapter.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the grid's PNG")
    p.add_argument("--column", default="unseen wording", choices=list(SPLITS),
                   help="the evaluation column the prompts come from")
    p.add_argument("--prompt-split", default="test", choices=PROMPT_SPLITS)
    p.add_argument("--per-kind", type=int, default=2, help="prompts of each kind")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    scenes = prompt_sets(max(args.per_kind, 8), 0, args.prompt_split)[args.column]
    scenes = [s for kind in KINDS for s in [x for x in scenes if x.kind == kind][:args.per_kind]]
    cell, label = 128, 16
    rows = []
    with tempfile.TemporaryDirectory() as output, comfy_client.ComfyServer(output) as server:
        workflow = load_api_workflow(server, WORKFLOW)
        positive = sorted(n["class_type"] for n in workflow.values()
                          if n["class_type"] in PROMPT_NODES and n["inputs"]["text"])
        if positive != sorted(PROMPT_NODES):
            raise SystemExit(f"workflows/{WORKFLOW} should have one positive prompt for the base model "
                             f"(LIDiTWordEncode) and one for the LLM (LLMPromptEncode), found {positive}: restore "
                             "the shipped workflow.")
        for scene in scenes:
            row = []
            for graph in (comfy_client.without_llm_adapter(workflow), workflow):
                image, pixels = sample(server, with_prompt(graph, scene.caption, args.seed))
                row.append((image.resize((cell, cell), Image.NEAREST), shapes_world.check(pixels, scene)))
            rows.append((scene, row))
    grid = Image.new("RGB", (2 * cell, label + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), "base model", fill="black")
    draw.text((cell + 4, 2), "+ LLM Diff Adapter", fill="black")
    for r, (_, row) in enumerate(rows):
        for c, (image, checked) in enumerate(row):
            grid.paste(image, (c * cell, label + r * cell))
            draw.rectangle([c * cell, label + r * cell, (c + 1) * cell - 1, label + (r + 1) * cell - 1],
                           outline="lime" if checked["overall"] else "yellow" if checked["color"] else "red")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    passes = {k: [sum(row[c][1][k] for _, row in rows) for c in (0, 1)] for k in ("overall", "color")}
    verdict = lambda v: "pass" if v["overall"] else "colour right" if v["color"] else "fail"  # noqa: E731
    with open(args.out + ".txt", "w") as f:
        f.write(f"workflows/lidit_shapes_adapter.json in ComfyUI, seed {args.seed}, {args.column} prompts "
                f"({args.prompt_split}); left: without Apply LLM Diff Adapter, right: with it. Frame: green, the "
                f"shapes-world checker passes (without / with: {passes['overall'][0]} / {passes['overall'][1]} of "
                f"{len(rows)}); yellow, only an object of every asked colour is there (colour right: "
                f"{passes['color'][0]} / {passes['color'][1]}); red, neither\n")
        for r, (scene, row) in enumerate(rows, 1):
            f.write(f"row {r}: {scene.caption}  [{verdict(row[0][1])} / {verdict(row[1][1])}]\n")
    print(f"wrote {args.out}: the checker passes {passes['overall'][0]} of {len(rows)} images without the adapter, "
          f"{passes['overall'][1]} with it; colour right {passes['color'][0]} and {passes['color'][1]}")


if __name__ == "__main__":
    main()

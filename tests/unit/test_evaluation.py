"""evaluation/: the GenEval-style evaluation, its held-out loss, and the ablation sweep's comparison grid."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from adapters.lidit import LIDiT, LIDiTConfig
from evaluation import ablations
from evaluation import evaluate as ev
from training.train_lidit import main as train_main

TINY = ["--batch-size", "4", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--context-dim", "16",
        "--num-pairs", "5", "--save-every", "2", "--eval-samples", "0", "--resolution", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llm_dirs):
    out = tmp_path_factory.mktemp("eval_run")
    train_main(["--llm", tiny_llm_dirs["llama"], "--out", str(out), "--steps", "2", "--name", "m", *TINY])
    return str(out / "m.safetensors"), [os.path.dirname(tiny_llm_dirs["llama"])]


def test_the_checker_accepts_ground_truth_renders():
    result = ev.evaluate(None, oracle=True, limit=8, images_per_prompt=1)
    assert set(result["categories"]) == set(ev.CATEGORIES)
    assert result["overall"] >= 0.9
    assert "heldout_loss" not in result


def test_evaluate_a_trained_model(trained, tmp_path):
    model, llm_dirs = trained
    grid, scores = tmp_path / "grid.png", tmp_path / "eval.json"
    result = ev.evaluate(model, limit=2, images_per_prompt=2, steps=2, llm_dirs=llm_dirs, device="cpu",
                         save_grid=str(grid), json_path=str(scores), log=lambda _: None)
    assert {c: r["images"] for c, r in result["categories"].items()} == {c: 4 for c in ev.CATEGORIES}
    hl = result["heldout_loss"]
    assert 0 < hl["conditional"] < 10 and 0 < hl["unconditional"] < 10
    assert hl["text_gain"] == pytest.approx(1 - hl["conditional"] / hl["unconditional"])
    assert json.loads(scores.read_text())["heldout_loss"] == hl
    # 8 prompts x 2 images, 8 per row
    assert Image.open(grid).size == (2 + 8 * 66, 2 + 2 * 66)
    assert len((tmp_path / "grid.txt").read_text().splitlines()) == 8
    again = ev.evaluate(model, limit=2, images_per_prompt=1, steps=1, llm_dirs=llm_dirs, device="cpu",
                        log=lambda _: None)
    assert again["heldout_loss"] == hl  # fixed draws: runs compare on the same noise and t


def test_heldout_loss_measures_what_the_text_adds():
    torch.manual_seed(0)
    model = LIDiT(LIDiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2, context_dims=(8,),
                              refiner_depth=0)).eval()
    for p in model.parameters():  # adaLN-Zero starts as identity; give the text a path to the output
        torch.nn.init.normal_(p, std=0.05)
    scenes = ev.prompt_sets(limit=2)["single"]

    def blind(captions):
        return [torch.ones(len(captions), 1, 8)], [torch.ones(len(captions), 1, dtype=torch.long)]

    def reading(captions):
        ctx = torch.stack([torch.full((1, 8), float(len(c))) for c in captions])
        return [ctx], [torch.ones(len(captions), 1, dtype=torch.long)]

    same = ev.heldout_loss(model, scenes, blind, 16, 0, "cpu", 8, draws=2)
    assert same["conditional"] == same["unconditional"] and same["text_gain"] == 0
    differs = ev.heldout_loss(model, scenes, reading, 16, 0, "cpu", 8, draws=2)
    assert differs["conditional"] != differs["unconditional"]


def test_comparison_grid_picks_the_same_prompts_from_every_run(tmp_path):
    kinds = ["single"] * 24 + ["pair"] * 32 + ["count"] * 8 + ["binding"] * 16
    names = ["run-a", "run-b"]
    for r, name in enumerate(names):
        os.makedirs(tmp_path / name)
        # image j of prompt i is a flat grey that encodes (run, prompt, image)
        images = [torch.full((3, 64, 64), (r * 100 + i + 0.5 * j) / 255) for i in range(len(kinds)) for j in (0, 1)]
        save_image(torch.stack(images), tmp_path / name / "heldout.png", nrow=8, padding=2, pad_value=0.5)
        (tmp_path / name / "heldout.txt").write_text("".join(f"{k}\tprompt {i}\n" for i, k in enumerate(kinds)))
    args = argparse.Namespace(out=str(tmp_path), images_per_prompt=2)
    ablations.comparison_grid(args, names, str(tmp_path / "cmp.png"))
    sheet = Image.open(tmp_path / "cmp.png").convert("L")
    listed = (tmp_path / "cmp.txt").read_text().splitlines()
    first = {"single": 0, "pair": 24, "count": 56, "binding": 64}
    expected = [first[k] + j for k, js in ablations.COMPARISON_PROMPTS.items() for j in js]
    assert [int(line.split("\t")[2].split()[1]) for line in listed] == expected
    for r in range(len(names)):
        for col, prompt in enumerate(expected):
            x, y = 120 + col * 68 + 32, 16 + r * 68 + 32
            assert sheet.getpixel((x, y)) == round(r * 100 + prompt), (r, col)


def test_loss_plot_log_scale_keeps_small_losses_apart():
    from evaluation.plots import loss_svg
    curves = {"a": ([1, 2, 3], [1.0, 0.1, 0.01]), "b": ([1, 2, 3], [1.0, 0.1, 0.02])}
    linear, log = loss_svg(curves, "t"), loss_svg(curves, "t", log_y=True)

    def last_y(svg, k):
        return float(svg.split("<polyline")[k + 1].split('points="')[1].split('"')[0].split()[-1].split(",")[1])

    # 0.01 vs 0.02 are about 2 px apart on a linear axis from 0 to 1, a tenth of the height on a log axis
    assert abs(last_y(linear, 0) - last_y(linear, 1)) < 3
    assert abs(last_y(log, 0) - last_y(log, 1)) > 25
    ticks = [float(t.split(">")[1].split("<")[0]) for t in log.split("<text")[1:] if 'text-anchor="end"' in t]
    assert len(ticks) == 5 and ticks[0] < 0.01 and ticks[-1] > 1
    ratios = [b / a for a, b in zip(ticks, ticks[1:])]
    assert max(ratios) / min(ratios) < 1.02  # evenly spaced on the log axis

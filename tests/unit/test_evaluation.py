"""evaluation/: the GenEval-style evaluation, its held-out loss, and the ablation sweep's comparison grid."""
from __future__ import annotations

import argparse
import json
import os
import random

import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from adapters.lidit import LIDiT, LIDiTConfig
from dataset import captions as caption_language
from dataset import shapes_world
from dataset.shapes_world import COLORS
from evaluation import ablations
from evaluation import evaluate as ev
from training.train_lidit import main as train_main

TINY = ["--batch-size", "4", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--context-dim", "16",
        "--pool-size", "25", "--save-every", "2", "--eval-samples", "0", "--resolution", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llm_dirs):
    out = tmp_path_factory.mktemp("eval_run")
    train_main(["--llm", tiny_llm_dirs["llama"], "--out", str(out), "--steps", "2", "--name", "m", *TINY])
    return str(out / "m.safetensors"), [os.path.dirname(tiny_llm_dirs["llama"])]


def test_the_checker_accepts_ground_truth_renders():
    result = ev.evaluate(None, oracle=True, per_kind=3, images_per_prompt=1)
    assert list(result["splits"]) == list(ev.SPLITS) == ["seen", "unseen combination", "unseen wording",
                                                          "both unseen"]
    assert all(row["prompts"] == 3 * len(ev.KINDS) for row in result["splits"].values())
    assert all(result["splits"][s]["overall"] >= 0.9 for s in ev.SPLITS)
    assert "heldout_loss" not in result


def test_the_colour_checker_accepts_ground_truth_renders():
    colors = ev.evaluate(None, oracle=True, per_kind=1, color_per_kind=4, images_per_prompt=1)["colors"]
    assert {c: row["prompts"] for c, row in colors.items()} == {
        "seen names": 16, "held-out names": 16, "held-out descriptions": 12}
    for row in colors.values():
        assert row["median_de"] < 1 and row["within_10"] == 1 and row["non_empty"] == 1 and row["overall"] >= 0.9


def test_colour_prompts_ask_for_their_columns_colours_and_validation_never_sees_test_colours():
    test, val = ev.color_prompt_sets(per_kind=8), ev.color_prompt_sets(per_kind=8, prompt_split="validation")
    opened = lambda scenes: {m.color for s in scenes for m in s.mentions if m.color not in COLORS}  # noqa: E731
    for sets in (test, val):
        assert all(sum(m.color not in COLORS for m in s.mentions) == 1 for v in sets.values() for s in v)
        assert all(caption_language.split_of(s) == ("seen", "seen") for v in sets.values() for s in v)
        assert opened(sets["seen names"]).isdisjoint(caption_language.HELD_OUT_COLORS)
        assert opened(sets["held-out names"]) <= caption_language.HELD_OUT_COLORS
        assert opened(sets["held-out descriptions"]) <= caption_language.HELD_OUT_COLORS
        assert all("the color of" in s.caption for s in sets["held-out descriptions"])
        assert [s.kind for s in sets["held-out descriptions"]] == [k for k in ev.COLOR_KINDS["held-out descriptions"]
                                                                   for _ in range(8)]
    for column in ("held-out names", "held-out descriptions"):
        assert opened(test[column]).isdisjoint(opened(val[column]))
    assert ev.color_prompt_sets(per_kind=8) == test  # fixed by the seed


def test_validation_prompts_are_in_their_columns_and_never_test_prompts():
    test = ev.prompt_sets(per_kind=4)
    val = ev.prompt_sets(per_kind=4, prompt_split="validation")
    reach = {s.caption for scenes in ev.prompt_sets(per_kind=ev.TEST_REACH).values() for s in scenes}
    for split, (wording, combination) in caption_language.SPLITS.items():
        assert [s.kind for s in val[split]] == [s.kind for s in test[split]]
        assert all(caption_language.split_of(s) == (wording, combination) for s in val[split])
        assert not reach & {s.caption for s in val[split]}
    assert ev.prompt_sets(per_kind=4, prompt_split="validation") == val
    with pytest.raises(ValueError, match="prompt_split"):
        ev.prompt_sets(per_kind=4, prompt_split="train")


def test_prompt_sets_are_in_their_columns():
    from dataset.captions import SPLITS, split_of
    sets = ev.prompt_sets(per_kind=4)
    for column, scenes in sets.items():
        assert [s.kind for s in scenes] == [k for k in ev.KINDS for _ in range(4)]
        assert all(split_of(s) == SPLITS[column] for s in scenes)
    assert ev.prompt_sets(per_kind=4) == sets  # fixed by the seed


def test_evaluate_a_trained_model(trained, tmp_path):
    model, llm_dirs = trained
    grid, scores = tmp_path / "grid.png", tmp_path / "eval.json"
    result = ev.evaluate(model, per_kind=1, images_per_prompt=2, steps=2, llm_dirs=llm_dirs, device="cpu",
                         save_grid=str(grid), json_path=str(scores), log=lambda _: None, loss_draws=2)
    assert {c: r["images"] for c, r in result["splits"].items()} == {c: 10 for c in ev.SPLITS}
    assert set(result["kinds"]) == set(ev.KINDS)
    for column in ev.SPLITS:
        hl = result["heldout_loss"][column]
        assert 0 < hl["conditional"] < 10 and 0 < hl["unconditional"] < 10
        assert hl["text_gain"] == pytest.approx(1 - hl["conditional"] / hl["unconditional"])
    assert json.loads(scores.read_text())["heldout_loss"] == result["heldout_loss"]
    table = ev.format_tables(result)
    assert "| criterion | seen | unseen combination | unseen wording | both unseen |" in table
    # 20 prompts of the four columns and 4 + 4 + 3 of the colour columns, x 2 images, 8 per row
    assert Image.open(grid).size == (2 + 8 * 66, 2 + 8 * 66)
    assert len((tmp_path / "grid.txt").read_text().splitlines()) == 31
    assert {c: r["images"] for c, r in result["colors"].items()} == {
        "seen names": 8, "held-out names": 8, "held-out descriptions": 6}
    assert len(result["color_records"]) == 22 and all(r["split"] in ev.COLOR_SPLITS for r in result["color_records"])
    assert "| median dE |" in table
    rd = result["relation_direction"]
    assert rd["prompts"] == len(ev.relation_probe_scenes()) and 0 < rd["own"] < 10 and 0 < rd["mirrored"] < 10
    assert "Relation direction (" in table
    again = ev.evaluate(model, per_kind=1, images_per_prompt=1, steps=1, llm_dirs=llm_dirs, device="cpu",
                        log=lambda _: None, loss_draws=2)
    assert again["heldout_loss"] == result["heldout_loss"]  # fixed draws: runs compare on the same noise and t
    assert again["relation_direction"] == rd


def test_evaluate_the_no_llm_baseline(tmp_path):
    """A model with the learned word encoder is evaluated without any LLM; held-out words reach it as <unk>."""
    out = tmp_path / "run"
    train_main(["--text-encoder", "learned", "--out", str(out), "--steps", "2", "--name", "b", *TINY])
    result = ev.evaluate(str(out / "b.safetensors"), per_kind=1, images_per_prompt=1, steps=2, device="cpu",
                         llm_dirs=[str(tmp_path / "no-llms-here")], log=lambda _: None, loss_draws=1)
    assert list(result["splits"]) == list(ev.SPLITS)
    assert all(0 <= row["overall"] <= 1 for row in result["splits"].values())
    assert all(0 < hl["conditional"] < 10 for hl in result["heldout_loss"].values())


def test_heldout_loss_measures_what_the_text_adds():
    torch.manual_seed(0)
    model = LIDiT(LIDiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2, context_dims=(8,),
                              refiner_depth=0)).eval()
    for p in model.parameters():  # adaLN-Zero starts as identity; give the text a path to the output
        torch.nn.init.normal_(p, std=0.05)
    scenes = ev.prompt_sets(per_kind=1)["seen"][:2]

    def blind(captions):
        return [torch.ones(len(captions), 1, 8)], [torch.ones(len(captions), 1, dtype=torch.long)]

    def reading(captions):
        ctx = torch.stack([torch.full((1, 8), float(len(c))) for c in captions])
        return [ctx], [torch.ones(len(captions), 1, dtype=torch.long)]

    same = ev.heldout_loss(model, scenes, blind, 16, 0, "cpu", 8, draws=2)
    assert same["conditional"] == same["unconditional"] and same["text_gain"] == 0
    differs = ev.heldout_loss(model, scenes, reading, 16, 0, "cpu", 8, draws=2)
    assert differs["conditional"] != differs["unconditional"]


def test_relation_probe_mirror_reverses_the_relation_and_nothing_else():
    scenes = ev.relation_probe_scenes(prompt_split="validation")
    assert len(scenes) >= 60 and {r.relation for s in scenes for r in s.relations} == set(ev.MIRRORED_RELATIONS)
    test = {s.caption for column in ev.prompt_sets(ev.TEST_REACH).values() for s in column}
    assert not test & {s.caption for s in scenes}
    for i, scene in enumerate(scenes[:12]):
        render = shapes_world.render(scene, 32, random.Random(i))
        own, mirrored = shapes_world.check(render, scene), shapes_world.check(render.flip(-1), scene)
        assert own["overall"] and not mirrored["relation"], scene.caption
        assert mirrored["color"] and mirrored["shape"] and mirrored["count"], scene.caption


@pytest.mark.parametrize("reads, prefers_own", [("own", 1.0), ("mirrored", 0.0)])
def test_relation_direction_tells_a_model_that_reads_the_relation(reads, prefers_own):
    """A model that denoises toward the render its caption describes (or toward its mirror image) prefers that
    render at every draw."""
    scenes = ev.relation_probe_scenes()[:5]
    renders = [shapes_world.render(s, 16, random.Random(i)) * 2 - 1 for i, s in enumerate(scenes)]
    if reads == "mirrored":
        renders = [r.flip(-1) for r in renders]

    def contexts(captions):
        index = torch.tensor([float(next(i for i, s in enumerate(scenes) if s.caption == c)) for c in captions])
        return [index.view(-1, 1, 1)], [torch.ones(len(captions), 1, dtype=torch.long)]

    def model(x_t, t, ctx, masks):  # the velocity that leads from x_t to the render it believes in
        x0 = torch.stack([renders[int(i)] for i in ctx[0].flatten()])
        tb = t.view(-1, 1, 1, 1)
        return (x_t - (1 - tb) * x0) / tb - x0

    result = ev.relation_direction(model, scenes, contexts, 16, 0, "cpu", 8, draws=3)
    assert result["prompts"] == 5 and result["prefers_own"] == prefers_own
    assert (result["own"] < result["mirrored"]) == (reads == "own")


def test_comparison_grid_picks_the_same_prompts_from_every_run(tmp_path):
    prompts = [(split, kind) for split in ev.SPLITS for kind in ev.KINDS for _ in range(2)]
    names = ["run-a", "run-b"]
    for r, name in enumerate(names):
        os.makedirs(tmp_path / name)
        # image j of prompt i is a flat grey that encodes (run, prompt, image)
        images = [torch.full((3, 64, 64), (r * 100 + i + 0.5 * j) / 255) for i in range(len(prompts)) for j in (0, 1)]
        save_image(torch.stack(images), tmp_path / name / "heldout.png", nrow=8, padding=2, pad_value=0.5)
        (tmp_path / name / "heldout.txt").write_text(
            "".join(f"{split}\t{kind}\tprompt {i}\n" for i, (split, kind) in enumerate(prompts)))
    args = argparse.Namespace(out=str(tmp_path), images_per_prompt=2, prompt_split="test")
    ablations.comparison_grid(args, names, str(tmp_path / "cmp.png"))
    sheet = Image.open(tmp_path / "cmp.png").convert("L")
    listed = (tmp_path / "cmp.txt").read_text().splitlines()
    expected = [prompts.index(key) + j for key, js in ablations.COMPARISON_PROMPTS.items() for j in js]
    assert [int(line.split("\t")[3].split()[1]) for line in listed] == expected
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


def test_targets_count_the_held_out_images_of_each_target():
    def rec(split, kind, **result):
        base = {"color": True, "shape": True, "count": True, "overall": True}
        base.update(result)
        base["overall"] = all(v for k, v in base.items() if k != "overall")
        return {"split": split, "kind": kind, "result": base}
    records = [rec("unseen wording", "single", position=True), rec("both unseen", "single", position=False),
               rec("seen", "single", position=True),  # in-distribution: in no held-out target but the colour one
               rec("unseen combination", "relation", relation=True), rec("unseen wording", "relation", relation=False),
               rec("both unseen", "count", count=False), rec("unseen wording", "pair", shape=False, color=False)]
    baseline = {"records": [rec("unseen wording", "single", position=False)]}
    rows = {what.split(" (")[0]: (got, goal) for what, got, goal in ev.targets({"records": records}, baseline)}
    assert rows["unseen wording, one object: colour + position"] == (0.5, 0.95)
    assert rows["two objects with a relation: all correct"] == (0.5, 0.5)
    assert rows["counts"] == (0.0, 0.6)
    assert rows["binding"] == (pytest.approx(2 / 3), 0.4)  # pair (wrong) and two relations (right)
    assert rows["every asked colour is in the image"] == (pytest.approx(6 / 7), 0.95)
    gap = [got for what, got, _ in ev.targets({"records": records}, baseline) if "baseline" in what][0]
    assert gap == pytest.approx(1 / 5 - 0.0)  # unseen-wording images all correct: 1 of 5, baseline 0 of 1
    table = ev.format_targets(ev.targets({"records": records}))
    assert "| 50.0 | 50 | yes |" in table and "| 0.0 | 60 | no |" in table


def test_blank_streams_read_the_empty_prompt_and_the_others_the_caption():
    """--base-prompt empty: the model's own word encoder reads "" while the adapter's LLM stream keeps the caption."""
    class Words(torch.nn.Module):
        def tokenize(self, captions):
            ids = torch.tensor([[len(c)] for c in captions])
            return ids, torch.ones_like(ids)

        def forward(self, ids):
            return ids[..., None].float()
    states = {c: torch.full((1, len(c) + 1, 2), float(len(c))) for c in ("", "a red circle")}
    streams = [("learned", Words()), (states, None)]
    for blank, lengths in ((frozenset(), (12, 12)), (frozenset({0}), (0, 12))):
        ctx, masks = ev.contexts_of(streams, "cpu", blank)(["a red circle"])
        assert ctx[0].flatten().tolist() == [lengths[0]]
        assert ctx[1][0, 0].unique().tolist() == [lengths[1]]

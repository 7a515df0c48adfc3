"""The README's held-out colour grid runs the shipped workflows in a real ComfyUI server on trained files that
live outside ComfyUI's folders, and scores every image."""
import os
import re
import shutil

import pytest
from PIL import Image

from evaluation import colour_grid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(ROOT, "models")


def test_colour_grid_runs_trained_files_in_the_server(tmp_path, capsys):
    trained = tmp_path / "runs"
    trained.mkdir()
    # names that no ComfyUI folder holds: the graphs can only run if the server lists the files given
    files = {}
    for key, shipped in (("model", "lidit/lidit-shapes-smollm2.safetensors"),
                         ("adapter", "llm_adapters/lidit-shapes-smollm2-adapter.safetensors"),
                         ("baseline", "lidit/lidit-shapes-nollm-canonical.safetensors"),
                         ("text_encoder", "llm_adapters/lidit-shapes-nollm-canonical-text-encoder.safetensors")):
        files[key] = str(trained / f"trained-{key}.safetensors")
        shutil.copy(os.path.join(MODELS, shipped), files[key])
    out = tmp_path / "grid.png"
    colour_grid.main(["--out", str(out), "--names", "1", "--descriptions", "1", "--model", files["model"],
                      "--adapter", files["adapter"], "--baseline", files["baseline"],
                      "--baseline-text-encoder", files["text_encoder"]])
    cell, label = colour_grid.CELL, colour_grid.LABEL
    assert Image.open(out).size == (2 * cell, cell // 2 + label + 2 * (label + cell))  # the swatches, two models
    scenes = colour_grid.grid_scenes(1, 1, "test")
    lines = (tmp_path / "grid.png.txt").read_text().splitlines()[1:]
    assert [line.split("  [")[0] for line in lines] == [f"column {i}: {s.caption}" for i, s in enumerate(scenes, 1)]
    for line in lines:  # one verdict per model: a dE or "nothing"
        assert re.search(r"\[dE (\d+\.\d|nothing) / (\d+\.\d|nothing)\]$", line), line
    printed = capsys.readouterr().out
    assert "LLM (trained-model.safetensors): median dE" in printed
    assert "no LLM (trained-baseline.safetensors): median dE" in printed


def test_colour_grid_refuses_a_model_without_its_adapter(capsys):
    with pytest.raises(SystemExit) as exit:
        colour_grid.main(["--out", "x.png", "--model", "m.safetensors", "--baseline", "b",
                          "--baseline-text-encoder", "t"])
    assert exit.value.code == 2
    assert "--model and --adapter go together" in capsys.readouterr().err

"""training/train_lidit.py, run in-process on tiny offline LLMs: artefacts, resume, layer selection, two LLMs."""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapters.checkpoint import load_adapter, load_lidit
from adapters.conditioning import hidden_states_to_context
from adapters.llm_encoder import INSTRUCTION_PRESETS, encode_prompts, load_llm
from dataset.features import caption_features, encoder_settings
from training.train_lidit import main

TINY = ["--batch-size", "4", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--context-dim", "16",
        "--pool-size", "25", "--save-every", "3", "--eval-samples", "2", "--resolution", "16", "--threads", "1"]
ADAPTER = ["--context-dim", "32"]  # adapter-only runs: the default token refiner needs whole heads of 32


def train(out, llms, steps: int, *extra: str) -> str:
    argv = [a for path in llms for a in ("--llm", path)]
    main(argv + ["--out", str(out), "--steps", str(steps), *TINY, *extra])
    return str(out)


def loss_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "loss.csv"), newline="") as f:
        return list(csv.DictReader(f))


def checkpoint_state(out: str) -> dict:
    with open(os.path.join(out, "checkpoint", "state.json")) as f:
        return json.load(f)


def optimizer_steps(out: str) -> set[int]:
    tensors = load_file(os.path.join(out, "checkpoint", "optimizer.safetensors"))
    return {int(v.item()) for k, v in tensors.items() if k.endswith(".step")}


@pytest.fixture(scope="module")
def run6(tmp_path_factory, tiny_llm_dirs):
    """Six steps on the tiny llama, checkpoints at 3 and 6."""
    return train(tmp_path_factory.mktemp("run6") / "out", [tiny_llm_dirs["llama"]], 6)


def test_loss_log(run6):
    rows = loss_rows(run6)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(float(r["loss"]) > 0 for r in rows)
    # Held-out accuracy is measured at every checkpoint only.
    assert [r["step"] for r in rows if r["heldout_accuracy"]] == ["3", "6"]
    assert all(0 <= float(r["heldout_accuracy"]) <= 1 for r in rows if r["heldout_accuracy"])


def test_training_checkpoint(run6):
    files = set(os.listdir(os.path.join(run6, "checkpoint")))
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"} <= files
    assert checkpoint_state(run6)["step"] == 6
    assert optimizer_steps(run6) == {6}
    assert not [f for f in os.listdir(run6) if f.endswith((".partial", ".old"))]


def test_exported_model_and_adapter(run6, arch_specs):
    model, info = load_lidit(os.path.join(run6, "lidit.safetensors"))
    assert model.config.context_dims == (16,)
    assert (model.config.hidden_size, model.config.depth, model.config.num_heads) == (32, 1, 2)
    (encoder,) = info["text_encoders"]
    assert encoder["llm"] == "llama" and encoder["layers"] == "all" and encoder["instruction"] == "li-dit"
    assert encoder["adapter"] == "lidit-adapter.safetensors"
    assert info["resolution"] == 16 and info["latent"] == "pixel_space"

    adapter, meta = load_adapter(os.path.join(run6, encoder["adapter"]))
    hidden, layers, _ = arch_specs["llama"]
    assert (adapter.llm_hidden_size, adapter.num_hidden_states, adapter.context_dim) == (hidden, layers + 1, 16)
    assert meta["llm"] == "llama" and json.loads(meta["encoder"])["layers"] == "all"

    # The export is the EMA of the last checkpoint, stored in fp16.
    ema = load_file(os.path.join(run6, "checkpoint", "ema.safetensors"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[f"lidit.{k}"].half().float(), atol=0, rtol=0)
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(v, ema[f"adapters.0.{k}"], atol=0, rtol=0)


def test_exported_model_runs_on_a_live_encoding(run6, tiny_llm_dirs):
    """What the metadata says is enough to encode a new prompt and run the exported model on it."""
    model, info = load_lidit(os.path.join(run6, "lidit.safetensors"))
    (encoder,) = info["text_encoders"]
    adapter, _ = load_adapter(os.path.join(run6, encoder["adapter"]))
    llm, tok = load_llm(tiny_llm_dirs[encoder["llm"]])
    enc = encode_prompts(llm, tok, ["a red circle in the center", ""], layers=encoder["layers"],
                         instruction=INSTRUCTION_PRESETS[encoder["instruction"]],
                         use_chat_template=encoder["chat_template"], max_tokens=encoder["max_tokens"])
    with torch.no_grad():
        context = hidden_states_to_context(enc.hidden_states, adapter)
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5]), [context], [enc.attention_mask])
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_resume_continues_where_it_stopped(run6, tmp_path, tiny_llm_dirs, capsys):
    out = shutil.copytree(run6, tmp_path / "out")
    caches = sorted(os.listdir(os.path.join(out, "cache")))
    capsys.readouterr()
    train(out, [tiny_llm_dirs["llama"]], 8, "--resume")
    assert "at step 6" in capsys.readouterr().out
    rows = loss_rows(str(out))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    # The first six rows are the original run's, untouched.
    assert rows[:6] == loss_rows(run6)
    assert checkpoint_state(str(out))["step"] == 8
    assert optimizer_steps(str(out)) == {8}  # Adam's step count continued rather than restarted
    assert sorted(os.listdir(os.path.join(out, "cache"))) == caches  # the LLM features were reused


def test_training_in_chunks_equals_one_run(run6, tmp_path, tiny_llm_dirs):
    """The default model is trained in chunks with --resume: the data, dropout and noise streams are restored from
    the checkpoint, so the chunks give exactly the weights and losses of one uninterrupted run."""
    llm = [tiny_llm_dirs["llama"]]
    chunked = train(tmp_path / "chunked", llm, 3)
    train(chunked, llm, 6, "--resume")
    assert loss_rows(chunked) == [{**r, "samples_per_s": c["samples_per_s"]} for r, c in
                                  zip(loss_rows(run6), loss_rows(chunked))]
    whole, parts = (load_file(os.path.join(out, "checkpoint", "model.safetensors")) for out in (run6, chunked))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_resume_after_a_crash_does_not_duplicate_log_rows(tmp_path, tiny_llm_dirs):
    """Killed after logging step 5 with the last checkpoint at step 3: resuming must not log steps 4-5 twice."""
    llm = [tiny_llm_dirs["llama"]]
    out = train(tmp_path / "out", llm, 3, "--eval-samples", "0")
    at_step_3 = shutil.copytree(os.path.join(out, "checkpoint"), tmp_path / "checkpoint-3")
    train(out, llm, 5, "--resume", "--eval-samples", "0")
    shutil.rmtree(os.path.join(out, "checkpoint"))
    shutil.copytree(at_step_3, os.path.join(out, "checkpoint"))  # the state a crash before step 6 leaves
    train(out, llm, 6, "--resume", "--eval-samples", "0")
    assert [int(r["step"]) for r in loss_rows(out)] == list(range(1, 7))


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_llm_dirs):
    out = train(tmp_path / "out", [tiny_llm_dirs["llama"]], 3, "--resume", "--eval-samples", "0")
    assert [int(r["step"]) for r in loss_rows(out)] == [1, 2, 3]
    assert checkpoint_state(out)["step"] == 3


def test_single_layer_without_adapter(tmp_path, tiny_llm_dirs, arch_specs):
    out = train(tmp_path / "out", [tiny_llm_dirs["llama"]], 3, "--layers", "-3", "--eval-samples", "0")
    model, info = load_lidit(os.path.join(out, "lidit.safetensors"))
    assert model.config.context_dims == (arch_specs["llama"][0],)
    (encoder,) = info["text_encoders"]
    assert encoder["layers"] == "-3" and encoder["adapter"] is None
    assert not [f for f in os.listdir(out) if "adapter" in f]
    assert not any(r["heldout_accuracy"] for r in loss_rows(out))


def test_two_llms_use_the_collaborative_refiner(tmp_path, tiny_llm_dirs, arch_specs):
    first, second = "llama", "qwen2"
    assert arch_specs[first][0] != arch_specs[second][0]
    out = train(tmp_path / "out", [tiny_llm_dirs[first], tiny_llm_dirs[second]], 3, "--eval-samples", "0")
    model, info = load_lidit(os.path.join(out, "lidit.safetensors"))
    assert model.config.context_dims == (16, 16) and model.config.fusion == "collaborative"
    assert model.refiner.collaborate
    # The branches' cross-attention gate starts at zero and is trained (fp32 training state; after three
    # warm-up steps it is still too small for the fp16 export).
    trained = load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    assert trained["lidit.refiner.cross_gate"].abs().sum() > 0
    assert [e["llm"] for e in info["text_encoders"]] == [first, second]
    for entry, arch in zip(info["text_encoders"], (first, second)):
        adapter, meta = load_adapter(os.path.join(out, entry["adapter"]))
        hidden, layers, _ = arch_specs[arch]
        assert (adapter.llm_hidden_size, adapter.num_hidden_states) == (hidden, layers + 1)
        assert meta["llm"] == arch
    assert info["text_encoders"][0]["adapter"] != info["text_encoders"][1]["adapter"]


def test_feature_cache_tells_llms_with_the_same_name_apart(tmp_path, tiny_llm_dirs):
    """Two different LLMs whose folders share a name (a shared --cache-dir makes this likely) must not share
    cached features."""
    first = str(shutil.copytree(tiny_llm_dirs["llama"], tmp_path / "a" / "model"))
    second = str(shutil.copytree(tiny_llm_dirs["qwen2"], tmp_path / "b" / "model"))
    captions = ["a red circle", "two blue squares"]
    cache = str(tmp_path / "cache")
    for path in (first, second):
        feats, num_states = caption_features(path, captions, encoder_settings(path, "all", "none", 16), cache)
        model, _ = load_llm(path)
        assert feats[0].shape[-1] == model.config.hidden_size
        assert num_states == model.config.num_hidden_layers + 1


# ---------------------------------------------------------------------------------------------------------------
# The no-LLM baseline


def test_learned_text_encoder_trains_saves_and_loads(tmp_path):
    from dataset import captions
    from adapters.checkpoint import load_word_encoder
    from adapters.word_encoder import UNK, build_vocabulary

    out = train(tmp_path / "out", [], 3, "--text-encoder", "learned")
    assert not os.path.exists(os.path.join(out, "cache"))  # no LLM, nothing to encode
    model, info = load_lidit(os.path.join(out, "lidit.safetensors"))
    assert model.config.context_dims == (16,) and model.config.refiner_depth == 2
    (entry,) = info["text_encoders"]
    assert entry["type"] == "learned" and entry["encoder"] == "lidit-text-encoder.safetensors"
    encoder, meta = load_word_encoder(os.path.join(out, entry["encoder"]))
    assert meta["format"] == "word-encoder"
    # the vocabulary is the training captions' words, and nothing held out
    pool = [s.caption for s in captions.training_pool(25)]
    assert encoder.vocabulary == build_vocabulary(pool)
    assert not captions.HELD_OUT_WORDS & set(encoder.vocabulary)
    ids, _ = encoder.tokenize(["a scarlet disc"])
    assert ids[0, 1:].tolist() == [encoder.index[UNK]] * 2
    # the export is the EMA of the last checkpoint
    ema = load_file(os.path.join(out, "checkpoint", "ema.safetensors"))
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(v, ema[f"adapters.0.{k}"], atol=0, rtol=0)
    ids, mask = encoder.tokenize([pool[0], ""])
    with torch.no_grad():
        out_img = model(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5]), [encoder(ids)], [mask])
    assert out_img.shape == (2, 3, 16, 16) and torch.isfinite(out_img).all()


def test_learned_text_encoder_resumes(tmp_path):
    out = train(tmp_path / "out", [], 3, "--text-encoder", "learned", "--eval-samples", "0")
    train(out, [], 5, "--text-encoder", "learned", "--eval-samples", "0", "--resume")
    assert [int(r["step"]) for r in loss_rows(out)] == list(range(1, 6))
    assert checkpoint_state(out)["step"] == 5


@pytest.mark.parametrize("llms, encoder", [([], "llm"), (["x.gguf"], "learned")])
def test_text_encoder_and_llm_flags_must_agree(tmp_path, llms, encoder):
    with pytest.raises(SystemExit):
        train(tmp_path / "out", llms, 1, "--text-encoder", encoder)


def test_adapter_only_training_freezes_the_base_and_saves_one_file(tmp_path, tiny_llm_dirs):
    """--base: the LI-DiT and its own (learned) text encoder stay frozen; an LLM Diff Adapter with a second
    cross-attention per block is trained on the tiny LLM and saved as one host-adapter file."""
    from adapters.checkpoint import load_host_adapter, load_word_encoder
    from adapters.diff_adapter import AdaptedLIDiT

    base_dir = train(tmp_path / "base", [], 3, "--text-encoder", "learned", "--eval-samples", "0")
    base_path = os.path.join(base_dir, "lidit.safetensors")
    out = train(tmp_path / "adapter", [tiny_llm_dirs["llama"]], 4, "--base", base_path, "--name", "host",
                "--export-weights", "raw", "--lr", "1e-2", "--warmup", "1", *ADAPTER)
    host, info = load_host_adapter(os.path.join(out, "host.safetensors"))
    base, _ = load_lidit(base_path)
    assert info["family"] == "lidit" and info["llm"] == os.path.basename(tiny_llm_dirs["llama"])
    assert json.loads(info["base"]) == "lidit.safetensors" and json.loads(info["encoder"])["layers"] == "all"
    assert host.sites == [(f"block{i}", 32, 2) for i in range(base.config.depth)]
    # the default start (an open gate, the value projection at zero): the value projection has learned
    assert all(b.gates()["llm_x_value_rms"] > 0 for b in host.branches), "the new branches never opened"
    # the base model and its word encoder in the final checkpoint are the base file's, bit for bit
    trained = load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    for k, v in base.state_dict().items():
        assert torch.equal(trained[f"lidit.base.{k}"].to(v.dtype), v), k
    encoder, _ = load_word_encoder(os.path.join(base_dir, "lidit-text-encoder.safetensors"))
    for k, v in encoder.state_dict().items():
        assert torch.equal(trained[f"adapters.0.{k}"], v), k
    # the file runs as the trainer ran it: the base model with the adapter's branches
    ids, mask = encoder.tokenize(["a red circle", ""])
    llm_context = host.adapter(torch.randn(2, host.adapter.num_hidden_states, 3, host.adapter.llm_hidden_size))
    with torch.no_grad():
        img = AdaptedLIDiT(base, host.branches)(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5]),
                                                [encoder(ids), llm_context], [mask, torch.ones(2, 3)])
    assert torch.isfinite(img).all()


def test_adapter_only_training_takes_one_llm_and_every_layer(tmp_path, tiny_llm_dirs, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path / "out", [tiny_llm_dirs["llama"]] * 2, 1, "--base", "base.safetensors", *ADAPTER)
    assert "exactly one --llm and --layers all" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(tmp_path / "out", [tiny_llm_dirs["llama"]], 1, "--base", "base.safetensors", "--layers", "last",
              *ADAPTER)
    assert "exactly one --llm and --layers all" in capsys.readouterr().err


def test_resuming_with_other_model_flags_names_where_the_run_s_flags_are(tmp_path, tiny_llm_dirs):
    base = train(tmp_path / "base", [], 1, "--text-encoder", "learned", "--eval-samples", "0")
    base_file = os.path.join(base, "lidit.safetensors")
    out = train(tmp_path / "adapter", [tiny_llm_dirs["llama"]], 3, "--base", base_file, "--eval-samples", "0",
                *ADAPTER)
    with pytest.raises(SystemExit, match=r"holds another model than these flags build .*refiner.*state\.json"):
        train(out, [tiny_llm_dirs["llama"]], 4, "--base", base_file, "--eval-samples", "0", "--resume",
              "--adapter-refiner-depth", "0", *ADAPTER)


def test_preset_takes_the_papers_sizes():
    from adapters.lidit import PRESETS
    from training.train_lidit import parse_args
    args = parse_args(["--text-encoder", "learned", "--out", "x", "--preset", "LI-DiT-1B", "--hidden-size", "8"])
    want = PRESETS["LI-DiT-1B"]
    assert (args.hidden_size, args.depth, args.num_heads, args.patch_size) == (
        want["hidden_size"], want["depth"], want["num_heads"], want["patch_size"])


def test_block_contributions_are_trained_on_and_named_in_the_metadata(tmp_path, tiny_llm_dirs):
    from adapters.checkpoint import trained_on_contributions
    llm = tiny_llm_dirs["llama"]
    out = train(tmp_path / "out", [llm], 2, "--block-outputs", "contributions", "--eval-samples", "0")
    _, info = load_lidit(os.path.join(out, "lidit.safetensors"))
    (entry,) = info["text_encoders"]
    assert entry["contributions"] is True
    _, meta = load_adapter(os.path.join(out, entry["adapter"]))
    assert trained_on_contributions(meta)
    states, _ = caption_features(llm, ["a red circle"], encoder_settings(llm, "all", "li-dit", 64), str(tmp_path))
    contrib, _ = caption_features(llm, ["a red circle"], encoder_settings(llm, "all", "li-dit", 64, True),
                                  str(tmp_path))
    assert contrib[0][0].abs().max() == 0 and not torch.equal(contrib[0], states[0])  # embeddings: no context


def test_precision_picks_the_autocast_dtype():
    from training.loop import mixed_precision
    assert mixed_precision("fp32") == "no" and mixed_precision("bf16") == "bf16"
    fast = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert mixed_precision("auto") == ("bf16" if fast else "no")


def test_bf16_and_compiled_training_follow_the_fp32_run(tmp_path, tiny_llm_dirs):
    from accelerate.state import AcceleratorState
    """The fast path (bf16 autocast, compiled model) trains the same model: the same checkpoint names and shapes,
    fp32 weights, and the loss of every step within bf16 rounding of the fp32 run's (same seed, same draws)."""
    llm = [tiny_llm_dirs["llama"]]
    fp32 = train(tmp_path / "fp32", llm, 3, "--precision", "fp32", "--eval-samples", "0")
    AcceleratorState._reset_state(reset_partial_state=True)  # a second training process, as far as accelerate knows
    fast = train(tmp_path / "fast", llm, 3, "--precision", "bf16", "--compile", "--eval-samples", "0")
    a, b = (load_file(os.path.join(out, "checkpoint", "model.safetensors")) for out in (fp32, fast))
    assert a.keys() == b.keys()
    assert all(b[k].shape == a[k].shape and b[k].dtype == torch.float32 for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 really ran
    for r, s in zip(loss_rows(fp32), loss_rows(fast)):
        assert float(s["loss"]) == pytest.approx(float(r["loss"]), rel=0.03)


def test_feature_noise_needs_the_adapter(capsys):
    from training.train_lidit import parse_args
    for argv in (["--text-encoder", "learned", "--feature-noise", "0.2"],
                 ["--llm", "x.gguf", "--layers", "last", "--feature-noise", "0.2"],
                 ["--llm", "x.gguf", "--feature-noise", "-0.2"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", *argv])
        assert "--feature-noise is a standard deviation (>= 0)" in capsys.readouterr().err
    assert parse_args(["--out", "x", "--llm", "x.gguf", "--feature-noise", "0.2"]).feature_noise == 0.2


def folder_bytes(folder) -> dict[str, bytes]:
    """Every file under folder (relative path -> contents)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.parametrize("left", [("loss.csv", "checkpoint"), ("loss.csv",), ("checkpoint",)])
def test_a_new_run_into_an_out_holding_one_is_refused_without_resume(run6, tmp_path, tiny_llm_dirs, left):
    """Without --resume a run would truncate the earlier run's loss log and overwrite its checkpoint at the first
    save; it must stop before it writes anything, naming both ways on."""
    out = shutil.copytree(run6, tmp_path / "out")
    for name in {"loss.csv", "checkpoint"} - set(left):
        shutil.rmtree(out / name) if os.path.isdir(out / name) else os.remove(out / name)
    before = folder_bytes(out)
    with pytest.raises(SystemExit, match=r"already holds a run .*--resume.*a new --out"):
        train(out, [tiny_llm_dirs["llama"]], 3, "--eval-samples", "0")
    assert folder_bytes(out) == before


def test_feature_noise_reaches_the_adapter_of_an_adapter_only_run(monkeypatch, tmp_path, tiny_llm_dirs):
    """--base builds its adapter inside a HostAdapter: the noise must be on that one, the adapter that trains."""
    import training.trainable as trainable
    from adapters.diff_adapter import HostAdapter
    built = []
    monkeypatch.setattr(trainable, "HostAdapter", lambda *a, **k: built.append(HostAdapter(*a, **k)) or built[-1])
    base = train(tmp_path / "base", [], 1, "--text-encoder", "learned", "--eval-samples", "0")
    train(tmp_path / "adapter", [tiny_llm_dirs["llama"]], 1, "--base", os.path.join(base, "lidit.safetensors"),
          "--feature-noise", "0.2", "--eval-samples", "0", *ADAPTER)
    adapter = built[0].adapter  # the trained one (an export builds another)
    assert adapter.training and adapter.refiner_depth == 2  # the recipe's refiner
    states = torch.randn(1, adapter.num_hidden_states, 3, adapter.llm_hidden_size)
    with torch.no_grad():
        assert not torch.equal(adapter(states), adapter(states)), "no noise on the trained adapter's input"
        assert torch.equal(adapter.eval()(states), adapter(states))  # and none outside training


def test_an_adapter_only_run_with_a_refiner_exports_it(tmp_path, tiny_llm_dirs):
    from adapters.checkpoint import load_host_adapter
    # adaLN-Zero: a base trained for fewer steps passes no gradient through its blocks to the adapter yet
    base = train(tmp_path / "base", [], 3, "--text-encoder", "learned", "--eval-samples", "0")
    out = train(tmp_path / "adapter", [tiny_llm_dirs["llama"]], 3, "--base", os.path.join(base, "lidit.safetensors"),
                "--adapter-refiner-depth", "1", "--eval-samples", "0", *ADAPTER)
    host, _ = load_host_adapter(os.path.join(out, "lidit.safetensors"))
    assert host.adapter.refiner_depth == 1
    # the refiner trained: its residual gates start at zero and moved
    assert host.adapter.refiner.blocks[0].adaLN_gates[1].weight.abs().sum() > 0


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_host_text_dropout_gives_the_base_the_empty_prompt_and_the_llm_the_caption(monkeypatch, tmp_path,
                                                                                   tiny_llm_dirs, share):
    """--host-text-dropout: the base model's own stream reads the empty prompt for that share of the samples,
    while the LLM stream keeps every caption (caption dropout, for CFG, still empties both)."""
    import training.train_lidit as trainer
    seen = {"base": [], "llm": []}

    def recording(streams_of, who):
        def wrapped(*a, **k):
            return [(lambda caps, f=f: (seen[who].append(list(caps)), f(caps))[1], *rest)
                    for f, *rest in streams_of(*a, **k)]
        return wrapped
    monkeypatch.setattr(trainer, "base_streams", recording(trainer.base_streams, "base"))
    monkeypatch.setattr(trainer, "new_text_streams", recording(trainer.new_text_streams, "llm"))
    base = train(tmp_path / "base", [], 1, "--text-encoder", "learned", "--eval-samples", "0")
    seen["base"].clear(), seen["llm"].clear()
    train(tmp_path / "adapter", [tiny_llm_dirs["llama"]], 2, "--base", os.path.join(base, "lidit.safetensors"),
          "--host-text-dropout", str(share), "--caption-dropout", "0", "--eval-samples", "0", *ADAPTER)
    assert len(seen["base"]) == len(seen["llm"]) == 2  # one call per training step
    for host, llm in zip(seen["base"], seen["llm"]):
        assert all(llm)
        assert host == ([""] * len(llm) if share else llm)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_host_word_dropout_reads_the_base_s_words_as_unknown(monkeypatch, tmp_path, tiny_llm_dirs, share):
    """--host-word-dropout: the base model's word encoder gets <unk> for that share of the caption's words (never
    for <pad>), as it gets a word its training never had."""
    from adapters.word_encoder import UNK, WordEncoder
    seen = []
    forward = WordEncoder.forward
    monkeypatch.setattr(WordEncoder, "forward", lambda self, ids: (seen.append((self, ids.clone())),
                                                                   forward(self, ids))[1])
    base = train(tmp_path / "base", [], 1, "--text-encoder", "learned", "--eval-samples", "0")
    seen.clear()
    train(tmp_path / "adapter", [tiny_llm_dirs["llama"]], 2, "--base", os.path.join(base, "lidit.safetensors"),
          "--host-word-dropout", str(share), "--host-text-dropout", "0", "--caption-dropout", "0",
          "--eval-samples", "0", *ADAPTER)
    assert len(seen) == 2  # the base's word encoder, once per training step
    for encoder, ids in seen:
        words = ids[ids != 0]
        assert words.numel() > 0
        unk = encoder.index[UNK]
        assert bool((words == unk).all()) if share else not bool((words == unk).any())


def test_unknown_words_replaces_words_and_never_padding():
    import random
    from adapters.word_encoder import UNK, WordEncoder
    from training.train_lidit import unknown_words
    encoder = WordEncoder(["<pad>", UNK, "a", "red", "circle"], 8)
    ids, _ = encoder.tokenize(["a red circle", "a", ""])  # right-padded, and the empty caption's one <pad>
    random.seed(0)
    assert torch.equal(unknown_words(ids, encoder, 0.0), ids)
    dropped = unknown_words(ids, encoder, 1.0)
    assert torch.equal(dropped == 0, ids == 0) and bool((dropped[ids != 0] == encoder.index[UNK]).all())


def test_host_word_dropout_samples_keeps_the_other_rows_whole():
    """--host-word-dropout-samples: only that share of the captions lose words; the others reach the base whole, and
    a share of 1 draws exactly as a run without the flag."""
    import random
    from adapters.word_encoder import UNK, WordEncoder
    from training.train_lidit import unknown_words
    encoder = WordEncoder(["<pad>", UNK, "a", "red", "circle"], 8)
    ids, _ = encoder.tokenize(["a red circle"] * 64)
    unk = encoder.index[UNK]
    random.seed(0)
    assert torch.equal(unknown_words(ids, encoder, 1.0, 0.0), ids)
    dropped = unknown_words(ids, encoder, 1.0, 0.5)
    whole, emptied = (dropped == ids).all(1), (dropped[:, :3] == unk).all(1)
    assert bool((whole | emptied).all()) and 16 < int(emptied.sum()) < 48
    random.seed(1)
    once = unknown_words(ids, encoder, 0.3)
    random.seed(1)
    assert torch.equal(unknown_words(ids, encoder, 0.3, 1.0), once)


def test_host_word_dropout_needs_a_base_with_its_own_word_encoder(tmp_path, tiny_llm_dirs, capsys):
    llm = [tiny_llm_dirs["llama"]]
    base = train(tmp_path / "base", llm, 1, "--eval-samples", "0")
    with pytest.raises(SystemExit, match="reads its prompt through an LLM: use --host-text-dropout"):
        train(tmp_path / "adapter", llm, 1, "--base", os.path.join(base, "lidit.safetensors"),
              "--host-word-dropout", "0.3", "--eval-samples", "0", *ADAPTER)
    from training.train_lidit import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--llm", "m.gguf", "--base", "b.safetensors", "--host-word-dropout", "2"])
    assert "--host-word-dropout is a share of words" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--llm", "m.gguf", "--base", "b.safetensors", "--host-word-dropout", "0.3",
                    "--host-word-dropout-samples", "-0.1"])
    assert "--host-word-dropout-samples is a share of samples" in capsys.readouterr().err


def test_an_adapter_trains_on_a_shipped_base_whose_word_encoder_is_in_the_adapter_folder(monkeypatch, tmp_path,
                                                                                        tiny_llm_dirs):
    """training.ship puts a model in models/lidit and its word encoder in models/llm_adapters: --base finds it there,
    as the README's command (--base models/lidit/lidit-shapes-nollm-canonical.safetensors) needs."""
    import training.ship as ship
    base = train(tmp_path / "base", [], 1, "--text-encoder", "learned", "--eval-samples", "0")
    (encoder,) = [f for f in os.listdir(base) if f.endswith("text-encoder.safetensors")]
    os.makedirs(tmp_path / "llm_adapters")
    shutil.move(os.path.join(base, encoder), tmp_path / "llm_adapters" / encoder)
    monkeypatch.setattr(ship, "ADAPTER_DIRS", [str(tmp_path / "llm_adapters")])
    out = train(tmp_path / "adapter", [tiny_llm_dirs["llama"]], 1, "--base", os.path.join(base, "lidit.safetensors"),
                "--eval-samples", "0", *ADAPTER)
    assert os.path.isfile(os.path.join(out, "lidit.safetensors"))


def test_adapter_recipe_flags_need_base(capsys):
    from training.adapter_recipe import ADAPTER_REFINER_DEPTH, HOST_TEXT_DROPOUT, LLM_GATE
    from training.train_lidit import parse_args
    for flag, value in (("--host-text-dropout", "0.5"), ("--host-word-dropout", "0.3"), ("--llm-gate", "0.5"),
                        ("--adapter-refiner-depth", "1"), ("--host-word-dropout-samples", "0.5")):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", "--text-encoder", "learned", flag, value])
        assert f"{flag}: adapter-only training options, which need --base" in capsys.readouterr().err
    args = parse_args(["--out", "x", "--llm", "m.gguf", "--base", "b.safetensors"])
    assert (args.host_text_dropout, args.llm_gate, args.adapter_refiner_depth, args.host_word_dropout,
            args.host_word_dropout_samples) == (HOST_TEXT_DROPOUT, LLM_GATE, ADAPTER_REFINER_DEPTH, 0.0, 1.0) == (
        0.5, 1.0, 2, 0.0, 1.0)  # the recipe chosen in results
    for depth, context in (("-1", "128"), ("2", "48")):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", "--llm", "m.gguf", "--base", "b.safetensors", "--adapter-refiner-depth", depth,
                        "--context-dim", context])
        assert f"--adapter-refiner-depth {depth} with --context-dim {context}: a refiner" in capsys.readouterr().err


def test_open_colour_captions_join_the_pool_at_their_share_and_leave_the_rest_as_it_was():
    from dataset import captions
    from training.data import ShapesData
    plain = ShapesData(25, 0, 16)
    data = ShapesData(25, 0, 16, open_color_pool=2, open_color_share=0.5)
    assert data.captions[:25] == plain.captions[:25] and len(data.captions) == 25 + 50 + 1
    assert all(captions.color_split(s) == "seen" for s in data.scenes[25:])
    _, idx = data.sample(400)
    assert 0.4 < sum(i >= 25 for i in idx) / 400 < 0.6
    # without open colours the draws are the trainer's as before: runs from older commands stay reproducible
    untouched = ShapesData(25, 0, 16, open_color_share=0.5)
    x, idx = untouched.sample(8)
    y, idy = plain.sample(8)
    assert idx == idy and torch.equal(x, y)


def test_init_fine_tunes_from_a_trained_model(run6, tmp_path, tiny_llm_dirs, monkeypatch):
    llm = [tiny_llm_dirs["llama"]]
    # laid out as shipped: the model in one folder, its adapter in models/llm_adapters
    os.makedirs(tmp_path / "lidit")
    start = shutil.copy(os.path.join(run6, "lidit.safetensors"), tmp_path / "lidit")
    shutil.copytree(run6, tmp_path / "llm_adapters", ignore=shutil.ignore_patterns("lidit.safetensors", "c*"))
    monkeypatch.setattr("training.ship.ADAPTER_DIRS", [str(tmp_path / "llm_adapters")])
    # At lr 0 nothing moves: the export is the --init model itself, weights and adapter.
    out = train(tmp_path / "tuned", llm, 2, "--init", start, "--lr", "0")
    for name in ("lidit.safetensors", "lidit-adapter.safetensors"):
        before, after = load_file(os.path.join(run6, name)), load_file(os.path.join(out, name))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fresh = load_file(os.path.join(train(tmp_path / "fresh", llm, 2, "--lr", "0"), "lidit.safetensors"))
    assert not all(torch.equal(fresh[k], load_file(start)[k]) for k in fresh)


def test_init_refuses_a_model_of_another_shape_or_with_base(run6, tmp_path, tiny_llm_dirs, capsys):
    start = os.path.join(run6, "lidit.safetensors")
    with pytest.raises(SystemExit, match="differ from this run's"):
        train(tmp_path / "wide", [tiny_llm_dirs["llama"]], 2, "--init", start, "--hidden-size", "64")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "w"), "--llm", "m.gguf", "--base", start, "--init", start])
    assert "give one of them" in capsys.readouterr().err


def test_init_of_a_word_encoder_model_keeps_the_words_it_knew_and_learns_new_ones(tmp_path):
    from adapters.checkpoint import load_word_encoder
    flags = ("--text-encoder", "learned", "--eval-samples", "0")
    start = os.path.join(train(tmp_path / "seven", [], 2, *flags), "lidit.safetensors")
    # open colours bring words the first run never had; at lr 0 the known ones stay as trained
    out = train(tmp_path / "open", [], 2, *flags, "--init", start, "--lr", "0", "--open-color-pool", "1")
    (old, _), (new, _) = (load_word_encoder(os.path.join(os.path.dirname(f), "lidit-text-encoder.safetensors"))
                          for f in (start, os.path.join(out, "lidit.safetensors")))
    added = set(new.vocabulary) - set(old.vocabulary)
    assert added and set(old.vocabulary) <= set(new.vocabulary)
    for w in old.vocabulary:
        assert torch.equal(new.embed.weight[new.index[w]], old.embed.weight[old.index[w]])
    assert torch.equal(new.position, old.position)
    before, after = (load_file(os.path.join(os.path.dirname(f), "lidit.safetensors")) for f in (start, out + "/x"))
    assert all(torch.equal(before[k], after[k]) for k in before)

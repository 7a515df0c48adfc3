"""benchmarks/bench_llm_beside_diffusion.py on its CPU path: the LLM it builds, and its three modes through ComfyUI."""
import os
import subprocess
import sys

import gguf
import torch

from adapters import gguf_weights, llm_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_LLM = os.path.join(ROOT, ".comfyui", "models", "LLM", "SmolLM2-135M-Instruct.Q4_1.gguf")
MODES = ("(a) all resident", "(b) partial load", "(c) --lowvram")


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_the_benchmark_runs_its_three_modes_on_a_quantized_llm_with_the_shipped_tokenizer(tmp_path):
    # A fresh process: the benchmark changes ComfyUI's memory settings, which must not reach the other tests.
    llm_path = str(tmp_path / "bench-llama-tiny-q4_0.gguf")
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_llm_beside_diffusion", "--device", "cpu",
                          "--size", "tiny", "--quick", "--llm-out", llm_path],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = table_rows(run.stdout)
    assert tuple(rows) == MODES, run.stdout
    for mode, row in rows.items():
        # On the CPU ComfyUI loads both models whole in every mode: a difference would be state that the benchmark
        # carried from one mode into the next.
        assert row["max abs diff of the encodings vs (a)"] == "0", (mode, row)
        assert row["max abs diff of the latent vs (a)"] == "0", (mode, row)
        encode, sample = row["encode s (per prompt)"].split(" / "), row["sample s (per prompt)"].split(" / ")
        assert len(encode) == len(sample) == 2 and all(float(t) > 0 for t in encode + sample), (mode, row)
        assert row["peak VRAM, GiB"] == "-" and row["LLM runs on"] == "cpu"

    model, tokenizer = llm_encoder.load_llm(llm_path)  # the LLM Loader's loader
    linears = [m for m in llm_encoder.decoder(model).modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the two blocks
    for m in linears + [model.get_input_embeddings()]:
        assert isinstance(m, gguf_weights.GGUFLayer) and m.gguf_type == gguf.GGMLQuantizationType.Q4_0
        values = m.in_features if isinstance(m, torch.nn.Linear) else m.embedding_dim
        assert m.weight.dtype == torch.uint8 and m.weight.shape[1] == values // 32 * 18  # 18 bytes per 32 values
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert torch.isfinite(llm_encoder.encode_prompts(model, tokenizer, ["a red circle"]).hidden_states).all()

    _, shipped = llm_encoder.load_llm(SHIPPED_LLM)
    assert tokenizer.get_vocab() == shipped.get_vocab() and tokenizer.chat_template == shipped.chat_template
    text = "a red triangle above a white circle"
    assert tokenizer(text)["input_ids"] == shipped(text)["input_ids"]

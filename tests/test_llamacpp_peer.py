"""The llama.cpp peer of `labkit bench throughput --peer llamacpp` (labkit/bench/llamacpp.py):
skipped with a clear message when llama-cpp-python is absent; when present, its greedy tokens
on the bundled GGUF are plausible under HF transformers' fp32 model of the same file."""
from __future__ import annotations

import sys

import pytest
import torch

from labkit.bench import llamacpp
from labkit.bench.workload import Request
from tests.helpers import hf_model, hf_tokenizer


def test_absent_binding_is_skipped_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # `import llama_cpp` fails
    fns, info = llamacpp.llamacpp_measurements("smollm2-135m", [], [], [], 256, 1)
    assert fns == {}
    assert "llama-cpp-python is not installed" in info["skipped"]
    assert "labkit[bench]" in info["skipped"]


def test_gguf_for_finds_the_bundled_file_and_refuses_others(tiny_llama_dir):
    from labkit.models.bundled import bundled_gguf_path
    assert llamacpp.gguf_for("smollm2-135m") == bundled_gguf_path()
    with pytest.raises(llamacpp.PeerUnavailable, match="dummy weights have none"):
        llamacpp.gguf_for("dummy:smollm2-135m")
    with pytest.raises(llamacpp.PeerUnavailable, match="needs a .gguf file"):
        llamacpp.gguf_for(str(tiny_llama_dir))


def test_greedy_tokens_are_plausible_under_hf_fp32():
    """HF dequantizes the file's Q4_1 weights to fp32; llama.cpp multiplies them as Q4_1 with
    activations rounded to 8 bits (Q8_1), so the two argmaxes part at near-ties: on this prompt
    HF gives "The" 0.152 and "L" 0.140, and llama.cpp picks "L". Token-for-token equality
    would test luck. What must hold: every token llama.cpp picks, teacher-forced through HF,
    is among HF's top 5 there (a wrong tokenizer, prompt, position or sampler fails that)."""
    pytest.importorskip("llama_cpp")
    peer = llamacpp.load_llamacpp("smollm2-135m", n_ctx=256, n_threads=torch.get_num_threads())
    tok = hf_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok.encode(text, add_special_tokens=False)
    got, _ = llamacpp.generate_one(peer, prompt, 12)
    assert len(got) == 12
    with torch.no_grad():
        logits = hf_model("smollm2-135m")(torch.tensor([prompt + got])).logits[0]   # (L, V) fp32
    steps = logits[len(prompt) - 1:-1]                                              # (12, V)
    top5 = steps.topk(5, -1).indices                                                # (12, 5)
    ranks_ok = [g in row.tolist() for g, row in zip(got, top5)]
    assert all(ranks_ok), (tok.decode(got), ranks_ok)
    # the run helper times the same thing the benchmark does
    r = llamacpp.run_llamacpp(peer, [Request(prompt, 4), Request(prompt[:5], 3)])
    assert r["output_tokens"] == 7 and r["output_tok_s"] > 0


def test_bench_throughput_names_why_the_peer_was_skipped():
    """A model without a .gguf (the tiny HF model): the run goes on, stderr and the JSON say why."""
    import json
    import subprocess
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "throughput", "tiny-llama",
                        "--peer", "llamacpp", "--num-requests", "3", "--input-len", "8", "16",
                        "--output-len", "2", "4", "--max-batch-size", "2", "--batch1-output-len", "2",
                        "--repeats", "1", "--json", "--log-level", "warning"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "llama.cpp peer skipped: llama.cpp needs a .gguf file" in r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert "needs a .gguf file" in result["llamacpp_peer"]["skipped"]
    assert "hf" not in result and "llamacpp" not in result and result["labkit"]["output_tokens"] > 0

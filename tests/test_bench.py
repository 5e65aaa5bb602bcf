"""`labkit bench throughput` runs end to end (tiny model, tiny workload) and keeps its contract:
a table, then one JSON object on the last line of stdout."""
import json
import subprocess
import sys


def test_bench_throughput_json_contract():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "throughput", "tiny-llama",
                        "--num-requests", "5", "--input-len", "8", "24", "--output-len", "3", "9",
                        "--max-batch-size", "2", "--batch1-output-len", "4", "--repeats", "1",
                        "--json", "--log-level", "warning"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("throughput: 5 requests") and "speedup vs HF" in r.stdout
    result = json.loads(lines[-1])
    assert result["workload"]["num_requests"] == 5 and result["workload"]["max_batch_size"] == 2
    # every request produced exactly its output length, for both engines
    assert result["labkit"]["output_tokens"] == result["hf"]["output_tokens"]
    assert 5 * 3 <= result["labkit"]["output_tokens"] <= 5 * 9
    assert result["labkit_batch1"]["output_tokens"] == 4
    assert result["speedup"] > 0 and result["commit"]


def test_hf_peer_runs_the_engines_weights():
    """The benchmarks' HF peer is built from the tensors the engine loads (dummy weights here):
    same logits as labkit's model on a random prompt."""
    import torch

    from labkit.bench.models import hf_model
    from labkit.models.dummy import MODEL_SHAPES
    from labkit.models.llama import LlamaForCausalLM
    model = "dummy:smollm2-135m"
    ours = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf = hf_model(model, MODEL_SHAPES["smollm2-135m"], torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits.float(), atol=2e-4, rtol=1e-4)


def test_bench_decode_dummy_weights_json():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "decode", "--load-format", "dummy",
                        "--model-shape", "smollm2-135m", "--dtype", "float32", "--points", "2x16",
                        "--steps", "3", "--json", "--log-level", "warning"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-3].split()[:3] == ["batch", "ctx", "labkit"]
    row = json.loads(lines[-1])["rows"][0]
    assert row["batch"] == 2 and row["labkit_tok_s"] > 0 and row["hf-eager_tok_s"] > 0
    assert 0 < row["fraction_of_roofline"] <= 1.5

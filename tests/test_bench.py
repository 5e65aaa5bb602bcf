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

"""KV-cache int8/int4 in the engine: capacity (scales counted), quality through `eval ppl`
against HF transformers, calibration statistics against HF's own activations, static
parameters in the workspace, and the bad-input errors (one line, workspace unchanged)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from helpers import hf_model, hf_tokenizer, workspace
from labkit import EngineConfig, GenerationConfig
from labkit.cli import main as cli_main
from labkit.engine.engine import LLMEngine


def _kv_nbytes(engine) -> int:
    """Bytes of every KV tensor the runner allocated (codes, scales and zeros)."""
    total = 0
    for k, v in engine.runner.kv_cache:
        for c in (k, v):
            parts = (c,) if torch.is_tensor(c) else (c.data, c.scale, c.zero)
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def test_capacity_at_equal_cache_max_entry_count():
    # the bundled model's shape in bf16 (the GPU cache's dtype); same fraction of the same budget
    tokens = {}
    for q in (0, 8, 4):
        e = LLMEngine("dummy:smollm2-135m", EngineConfig(
            quant_policy=q, dtype="bfloat16", device="cpu", cache_max_entry_count=0.5,
            kv_budget_gib=0.5, max_batch_size=64, session_len=2048))
        st = e.stats()
        assert st["kv_quant_policy"] == q and "capped" not in e.kv_plan.how
        assert _kv_nbytes(e) == st["bytes_total"] == st["tokens_total"] * st["kv_bytes_per_token"]
        tokens[q] = st["tokens_total"]
    assert tokens[8] >= 1.9 * tokens[0], tokens
    assert tokens[4] >= 3.5 * tokens[0], tokens


def _hf_ppl(ids: torch.Tensor) -> float:
    """HF transformers' perplexity of each row of ids (n, L), every token after the first."""
    m = hf_model()
    with torch.inference_mode():
        logits = m(ids).logits[:, :-1].float()                               # (n, L-1, V)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(nll.item())


def test_eval_ppl_matches_hf_and_quantized_quality():
    from labkit.corpus import pydoc_text, token_chunks
    from labkit.eval import perplexity
    ws = workspace()
    ids = token_chunks(hf_tokenizer()(pydoc_text())["input_ids"], 128, 2)    # (2, 128)
    ref = _hf_ppl(ids)
    kw = dict(seqlen=128, chunks=2, batch=2, prefill_chunk=48,               # 3 pieces per sequence
              engine_config=EngineConfig(dtype="float32"))                   # the HF reference's dtype
    fp = perplexity(ws, 0, **kw)
    assert fp["tokens"] == 2 * 127
    assert fp["ppl"] == pytest.approx(ref, rel=1e-4)                         # the paged path is exact
    int8 = perplexity(ws, 8, **kw)
    int4 = perplexity(ws, 4, **kw)
    assert int8["kv_bytes_per_token"] < fp["kv_bytes_per_token"] / 3         # fp32 cache on CPU
    assert fp["ppl"] * 0.995 < int8["ppl"] < fp["ppl"] * 1.01
    assert fp["ppl"] < int4["ppl"] < fp["ppl"] * 1.25


def test_calibrate_statistics_match_hf_activations(tiny_stats, tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from labkit.corpus import EVAL_TOKENS, pydoc_text, token_chunks
    key = torch.load(tiny_stats / "key_stats.pth", weights_only=True)
    val = torch.load(tiny_stats / "value_stats.pth", weights_only=True)
    ins = torch.load(tiny_stats / "inputs_stats.pth", weights_only=True)
    assert key["meta"]["samples"] == 3 and key["max"].shape == (2, 2, 16)    # (layers, Hkv, D)
    # HF on the same calibration tokens: K after RoPE, V, and q_proj's input, by hooks
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = token_chunks(hf_tokenizer()(pydoc_text())["input_ids"], 40, 3, start=EVAL_TOKENS)
    seen = {}
    for i, layer in enumerate(m.model.layers):
        a = layer.self_attn
        a.k_proj.register_forward_hook(lambda mod, x, y, i=i: seen.__setitem__(("k", i), y))
        a.v_proj.register_forward_hook(lambda mod, x, y, i=i: seen.__setitem__(("v", i), y))
        a.q_proj.register_forward_hook(lambda mod, x, y, i=i: seen.__setitem__(("x", i), x[0]))
    with torch.inference_mode():
        m(ids)
        pos = torch.arange(40)[None].expand(3, 40)
        cos, sin = m.model.rotary_emb(seen[("k", 0)], pos)
    for i in range(2):
        k = seen[("k", i)].view(3, 40, 2, 16).transpose(1, 2)                # (S, Hkv, L, D)
        k = apply_rotary_pos_emb(k, k, cos, sin)[1].transpose(1, 2).reshape(-1, 2, 16)
        v = seen[("v", i)].reshape(-1, 2, 16)                                # (S*L, Hkv, D)
        x = seen[("x", i)].reshape(-1, 64)                                   # (S*L, H)
        tol = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(key["max"][i], k.amax(0), **tol)
        torch.testing.assert_close(key["min"][i], k.amin(0), **tol)
        torch.testing.assert_close(val["absmax"][i], v.abs().amax(0), **tol)
        torch.testing.assert_close(val["mean"][i], v.mean(0), **tol)
        torch.testing.assert_close(ins["max"][f"layers.{i}.attention.w_qkv"], x.amax(0), **tol)


def test_kv_qparams_static_int8_in_the_engine(tiny_stats, tmp_path):
    import shutil

    from labkit.quant.calibrate import load_kv_stats
    from labkit.quant.kv_qparams import qparams_from_stats
    ws = tmp_path / "ws"
    shutil.copytree(workspace("tiny-llama"), ws)
    assert cli_main(["lite", "kv_qparams", str(tiny_stats), str(ws / "triton_models" / "weights")]) == 0
    want = qparams_from_stats(load_kv_stats(tiny_stats), 8, False)           # (L, 2, Hkv, 2)
    # the asymmetric range holds every calibration value: codes in range, zero an integer
    assert (want[..., 1] == want[..., 1].round()).all() and (want[..., 1] <= 255).all()
    e = LLMEngine(str(ws), EngineConfig(quant_policy=8, cache_max_entry_count=8, max_batch_size=2,
                                        session_len=256, dtype="float32"))
    assert e.stats()["kv_calibrated"]
    k0, v0 = e.runner.kv_cache[1]
    torch.testing.assert_close(k0.static, want[1, 0])
    v0.scale.fill_(float("nan"))
    out = e.generate(["The Python language"], GenerationConfig(max_new_tokens=6, ignore_eos=True))[0]
    # every written slot of the side cache holds the calibrated scale of its head
    n = out.num_prompt_tokens + len(out.token_ids) - 1                      # the last is not stored
    rows = v0.scale.flatten(0, 1)                                            # (slots, Hkv)
    written = rows[~rows.isnan().any(-1)].float()                            # (n, Hkv)
    assert written.shape[0] == n > 0
    assert torch.equal(written, want[1, 1, :, 0].half().float().expand(n, -1))
    # int4 does not use int8 parameters: it quantizes online
    e4 = LLMEngine(str(ws), EngineConfig(quant_policy=4, cache_max_entry_count=8, session_len=256,
                                         dtype="float32"))
    assert not e4.stats()["kv_calibrated"]


def test_kv_qparams_static_int4_float_zero_in_the_engine(tiny_stats, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from labkit.config import ConfigError
    from labkit.quant.calibrate import load_kv_stats
    from labkit.quant.kv_qparams import qparams_from_stats
    ws = tmp_path / "ws"
    shutil.copytree(workspace("tiny-llama"), ws)
    wdir = ws / "triton_models" / "weights"
    assert cli_main(["lite", "kv_qparams", str(tiny_stats), str(wdir), "--kv-bits", "4"]) == 0
    stats = load_kv_stats(tiny_stats)
    want = qparams_from_stats(stats, 4, False)                               # (L, 2, Hkv, 2)
    # static int4: zero = the head's calibrated minimum (a float), scale = its range / 15
    lo = stats["key"]["min"].float().amin(-1)                                # (L, Hkv)
    torch.testing.assert_close(want[:, 0, :, 1], lo.half().float())
    assert (want[..., 1] != want[..., 1].round()).any()
    e = LLMEngine(str(ws), EngineConfig(quant_policy=4, cache_max_entry_count=8, max_batch_size=2,
                                        session_len=256))
    assert e.stats()["kv_calibrated"]
    k1, _ = e.runner.kv_cache[1]
    torch.testing.assert_close(k1.static, want[1, 0])
    k1.scale.fill_(float("nan"))
    out = e.generate(["The Python language"], GenerationConfig(max_new_tokens=4, ignore_eos=True))[0]
    n = out.num_prompt_tokens + len(out.token_ids) - 1
    written = ~k1.scale.flatten(0, 1).isnan().any(-1)                       # (slots,)
    assert int(written.sum()) == n > 0
    zeros = k1.zero.flatten(0, 1)[written]                                   # (n, Hkv) float16
    assert torch.equal(zeros.float(), want[1, 0, :, 1].expand(n, -1))
    # int4 parameters of an older labkit (integer zero point, no kv_zero metadata): refused
    f = wdir / "kv_qparams.safetensors"
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        meta = {k: v for k, v in h.metadata().items() if k != "kv_zero"}
    save_file(load_file(str(f)), str(f), metadata=meta)
    with pytest.raises(ConfigError, match="float16 zero"):
        LLMEngine(str(ws), EngineConfig(quant_policy=4, cache_max_entry_count=8, session_len=256))


@pytest.mark.parametrize("bits,sym", [(8, False), (8, True), (4, False), (4, True)])
def test_static_params_hold_every_calibration_value(bits, sym):
    # statistics of known K/V: per head a different spread and offset (head 2 all positive)
    from kernels.kv_quant import dequantize_ref, quantize_ref
    from labkit.quant.kv_qparams import qparams_from_stats
    spread = torch.tensor([1.0, 3.0, 0.2])[:, None]
    shift = torch.tensor([0.0, -0.5, 5.0])[:, None]
    x = {w: torch.randn(400, 2, 3, 16) * spread + shift for w in ("key", "value")}  # (N, L, Hkv, D)
    stats = {w: {"min": t.amin(0), "max": t.amax(0), "absmax": t.abs().amax(0)} for w, t in x.items()}
    params = qparams_from_stats(stats, bits, sym)                            # (L, 2, Hkv, 2)
    assert params.shape == (2, 2, 3, 2)
    for j, w in enumerate(("key", "value")):
        for layer in range(2):
            st = params[layer, j]                                            # (Hkv, 2)
            codes, scale, zero = quantize_ref(x[w][:, layer], bits, st)      # (N, Hkv, D)
            assert zero.dtype == (torch.uint8 if bits == 8 else torch.float16)
            err = (dequantize_ref(codes, scale, zero) - x[w][:, layer]).abs()
            # nothing clipped: every value within half a step (+ float16 rounding of the params)
            bound = 0.5 * st[:, 0] + stats[w]["absmax"][layer].amax(-1) * 2 ** -8  # (Hkv,)
            assert (err <= bound[:, None]).all(), (w, layer, (err.amax((0, 2)) / st[:, 0]))


def _tree(d):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*"))


@pytest.mark.parametrize("case", ["other_model", "missing_stats", "kv_bits_3", "num_tp"])
def test_kv_qparams_bad_input(case, tiny_stats, tmp_path, capsys):
    stats, wdir = tmp_path, workspace("tiny-llama") / "triton_models" / "weights"
    args, field = [], "statistics"
    if case == "other_model":   # statistics of a model with one layer fewer than the workspace's
        for name in ("key_stats.pth", "value_stats.pth"):
            st = torch.load(tiny_stats / name, weights_only=True)
            torch.save({k: (v[:1] if torch.is_tensor(v) else v) for k, v in st.items()}, tmp_path / name)
        field = "statistics in"
    elif case == "missing_stats":
        field = "key_stats.pth is missing"
    elif case == "kv_bits_3":
        stats, args, field = tiny_stats, ["--kv-bits", "3"], "--kv-bits must be 8 or 4"
    elif case == "num_tp":
        stats, args, field = tiny_stats, ["--num-tp", "3"], "--num-tp must divide"
    before = _tree(wdir)
    assert cli_main(["lite", "kv_qparams", str(stats), str(wdir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("labkit: error:") and field in err and "\n" not in err
    assert _tree(wdir) == before                                             # nothing written


def test_eval_ppl_cli_json_and_bad_quant_policy(labkit_run, capsys):
    r = labkit_run("eval", "ppl", "tiny-llama", "--quant-policy", "4", "--seqlen", "64",
                   "--chunks", "2", "--json")
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["tokens"] == 2 * 63 and last["quant_policy"] == 4 and math.isfinite(last["ppl"])
    assert cli_main(["eval", "ppl", "tiny-llama", "--quant-policy", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "quant_policy=3 is not allowed" in err and "0 (model dtype KV), 4 (int4 KV), 8 (int8 KV)" in err


def test_quant_policy_3_in_config_ini_is_refused(tmp_path):
    import shutil

    from labkit.config import ConfigError
    from labkit.workspace_ini import update_config_ini
    ws = tmp_path / "ws"
    shutil.copytree(workspace("tiny-llama"), ws)
    with pytest.raises(ConfigError, match="quant_policy"):
        update_config_ini(ws / "triton_models" / "weights", quant_policy=3)
    assert os.path.isfile(ws / "triton_models" / "weights" / "config.ini")

"""4-bit weights: group quantization, the AWQ checkpoint layout, AWQ smoothing, `labkit lite
auto_awq` -> `labkit convert --model-format awq` -> the engine, and the errors on bad input.

References are independent of the code under test: float64 formulas, a bit-by-bit reading
of AutoAWQ's packing, HF transformers computing with the dequantized weights.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from labkit.quant.awq import AWQSettings, quantize_model, smooth_layer, _capture_inputs
from labkit.quant.int4 import (AWQ_ORDER, QuantError, check_group_size, default_group_size,
                               pack_awq, quantize_groups, unpack_awq)
from tests.conftest import run_labkit

TINY_IN = {"attention.w_qkv": 64, "attention.wo": 64, "feed_forward.w13": 64, "feed_forward.w2": 128}
SMOL_IN = {"attention.w_qkv": 576, "attention.wo": 576, "feed_forward.w13": 576, "feed_forward.w2": 1536}


# ---------------------------------------------------------------------------- int4 math
def test_min_max_codes_match_float64_formula():
    w = torch.randn(6, 64) * 0.05
    q, s, z = quantize_groups(w, 32)
    for n, g in [(0, 0), (5, 1), (3, 1)]:
        blk = w[n, 32 * g:32 * g + 32].double()
        scale = float(torch.tensor((blk.max() - blk.min()).item() / 15).half())
        zero = min(max(round(-blk.min().item() / scale), 0), 15)
        assert s[n, g].item() == pytest.approx(scale, rel=1e-6) and z[n, g].item() == zero
        codes = [min(max(round(v / scale) + zero, 0), 15) for v in blk.tolist()]
        assert q[n, 32 * g:32 * g + 32].tolist() == codes
    err = ((q.float() - z.float().repeat_interleave(32, 1)) * s.float().repeat_interleave(32, 1) - w)
    assert err.abs().max() <= s.float().max() * 0.51            # at most half a step (+ fp16 s)


def test_symmetric_codes_centre_on_eight():
    w = torch.randn(4, 64)
    q, s, z = quantize_groups(w, 64, sym=True)
    assert (z == 8).all()
    assert torch.allclose(s.float(), (w.abs().amax(1, keepdim=True) / 7).half().float())


def test_nan_weights_are_refused():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        quantize_groups(w, 32)


def test_group_size_rules():
    assert default_group_size(SMOL_IN) == 64            # hidden 576 = 4.5 x 128
    assert default_group_size({"a": 4096, "b": 11008}) == 128
    with pytest.raises(QuantError, match=r"does not divide in_features=576 .* one of \[32, 64\]"):
        check_group_size(128, SMOL_IN)
    with pytest.raises(QuantError, match="must be one of 32, 64, 128"):
        check_group_size(48, SMOL_IN)


def test_awq_packing_bit_by_bit():
    q = torch.randint(0, 16, (3, 16), dtype=torch.uint8)                 # (K, N)
    packed = pack_awq(q)
    assert packed.shape == (3, 2) and packed.dtype == torch.int32
    for k in range(3):
        for j in range(2):
            word = int(packed[k, j]) & 0xFFFFFFFF
            for i in range(8):
                assert (word >> (4 * i)) & 15 == int(q[k, 8 * j + AWQ_ORDER[i]])
    assert torch.equal(unpack_awq(packed), q)


# ---------------------------------------------------------------------------- AWQ smoothing
@pytest.fixture(scope="module")
def tiny_model():
    from labkit.models.llama import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained("tiny-llama")


@torch.no_grad()
def test_smoothing_keeps_the_fp_function(tiny_model):
    """Folding the scales (norm / s, columns * s, v rows / s with GQA-shared o scales) changes
    the weights but not what the fp layer computes."""
    import copy
    layer = copy.deepcopy(tiny_model.layers[0])
    x = torch.randn(2, 24, 64) * 3
    pos = torch.arange(24).expand(2, 24)
    feats, out, res = _capture_inputs(layer, x, None, pos, batch=8)
    w_before = layer.attention.w_qkv.weight.clone()
    results = smooth_layer(0, layer, feats, pos, AWQSettings(group_size=32, alpha=0.5))
    assert [r.group for r in results] == ["qkv", "o", "ffn", "down"]
    assert not torch.allclose(layer.attention.w_qkv.weight, w_before)    # scales were applied
    out2, res2 = layer(x, None, pos, None)
    torch.testing.assert_close(out2, out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res2, res, atol=1e-4, rtol=1e-4)


def test_search_never_loses_to_round_to_nearest(tiny_model):
    import copy
    model = copy.deepcopy(tiny_model)
    ids = torch.randint(0, 49152, (4, 32))
    quantized, results = quantize_model(model, ids, AWQSettings(group_size=32, search=True),
                                        progress=False)
    assert len(results) == 4 * 2 and len(quantized) == 4 * 2
    assert all(r.loss <= r.loss_rtn for r in results)                   # alpha = 0 is on the grid
    assert all(len(r.losses) == 20 for r in results)


def _clip_reference64(w, x, gs):
    """Brute force in float64, one (row, group) at a time: the grid's (r_lo, r_hi) whose clipped
    4-bit weights give the smallest mean squared error of that group's share of the output."""
    from labkit.quant.awq_clip import CLIP_GRID_PAIRS
    N, K = w.shape
    best = torch.ones(N, K // gs, 2, dtype=torch.float64)
    for n in range(N):
        for g in range(K // gs):
            wg = w[n, g * gs:(g + 1) * gs].double()
            xg = x[:, g * gs:(g + 1) * gs].double()
            errs = []
            for r_lo, r_hi in CLIP_GRID_PAIRS:
                cw = wg.clamp(wg.min() * r_lo, wg.max() * r_hi)
                lo, hi = cw.min(), cw.max()                   # int4.py's min-max rule, float64
                s = (hi - lo).clamp(min=1e-5) / 15
                s = s.half().double()
                z = torch.round(-lo / s).clamp(0, 15)
                q = (torch.round(cw / s) + z).clamp(0, 15)
                errs.append((xg @ ((q - z) * s - wg)).pow(2).mean().item())
            best[n, g] = torch.tensor(CLIP_GRID_PAIRS[min(range(len(errs)), key=errs.__getitem__)])
    return best


def test_clip_picks_the_range_a_float64_search_picks():
    from labkit.quant.awq_clip import clip_weight
    gs = 32
    w = torch.randn(24, 128) * 0.05
    w[torch.rand_like(w) < 0.02] *= 12                          # a few outlier weights
    x = torch.randn(200, 128) * torch.rand(128) * 3             # channels of different size
    want = _clip_reference64(w, x, gs)
    w_clip = w.clone()
    got = clip_weight(w_clip, x, gs, tokens=200, rows_per_chunk=10)   # several row chunks
    agree = ((got.double() - want).abs() < 1e-6).all(-1).float().mean().item()
    assert agree >= 0.95, agree            # float32 vs float64 may split a near-tie or two
    assert (got < 1).any(), "outliers should make some groups clip"
    assert (got[..., 0] != got[..., 1]).any(), "the two ends should not always move together"
    wg = w.view(24, 4, gs)
    lo, hi = wg.amin(-1, keepdim=True) * got[..., :1], wg.amax(-1, keepdim=True) * got[..., 1:]
    torch.testing.assert_close(w_clip.view(24, 4, gs), torch.clamp(wg, lo, hi))


def test_clip_never_raises_the_group_output_error():
    from labkit.quant.awq_clip import clip_weight
    from labkit.quant.int4 import fake_quantize
    gs = 64
    w = torch.randn(16, 256) * 0.05
    x = torch.randn(300, 256)
    w_clip = w.clone()
    clip_weight(w_clip, x, gs)
    err = lambda v: (x.view(300, 4, gs) * (fake_quantize(v, gs) - w).view(1, 16, 4, gs)  # noqa: E731
                     .transpose(0, 1)).sum(-1).pow(2).mean(1)           # (16, 4) per group
    assert (err(w_clip) <= err(w) + 1e-7).all()


def test_auto_clip_runs_in_quantize_model_and_rtn_refuses_it(tiny_model):
    import copy
    from labkit.quant.int4 import QuantError
    ids = torch.randint(0, 49152, (4, 32))
    plain, clipped = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    quantize_model(plain, ids, AWQSettings(group_size=32), progress=False)
    quantized, _ = quantize_model(clipped, ids, AWQSettings(group_size=32, clip=True),
                                  progress=False)
    assert len(quantized) == 4 * 2
    changed = 0
    for lp, lc in zip(plain.layers, clipped.layers):
        # same smoothing; then every linear's weights only shrink toward zero
        for name in ("attention.w_qkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
            wp, wc = lp.get_submodule(name).weight, lc.get_submodule(name).weight
            assert (wc.abs() <= wp.abs()).all() and (wc * wp >= 0).all()
            changed += int(not torch.equal(wc, wp))
    assert changed > 0, "no weight was clipped"
    with pytest.raises(ValueError, match="method=awq only"):
        quantize_model(copy.deepcopy(tiny_model), None, AWQSettings(group_size=32, method="rtn",
                                                                    clip=True), progress=False)
    from labkit.quant.awq_lite import auto_awq
    with pytest.raises(QuantError, match="not allowed with method=rtn"):
        auto_awq("tiny-llama", "/nonexistent/never-written", method="rtn", auto_clip=True)


# ---------------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("awq") / "tiny-awq"
    r = run_labkit("lite", "auto_awq", "tiny-llama", "--work-dir", d,     # group: default (64)
                   "--calib-samples", "4", "--calib-seqlen", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def awq_ws(awq_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws") / "tiny-int4"
    r = run_labkit("convert", awq_dir, "--model-format", "awq", "--dst-path", ws, "--no-progress")
    assert r.returncode == 0, r.stderr
    return ws


def _independent_dequant(path):
    """HF-named float32 weights of an AWQ folder, read bit by bit with numpy (no labkit code)."""
    import numpy as np
    cfg = json.loads((path / "config.json").read_text())
    G = cfg["quantization_config"]["group_size"]
    raw = load_file(str(path / "model.safetensors"))
    order = np.argsort(AWQ_ORDER)                   # nibble holding column c of each word

    def unpack(t):                                  # (R, C/8) int32 -> (R, C)
        words = t.numpy().astype(np.int64) & 0xFFFFFFFF
        nib = np.stack([(words >> (4 * i)) & 15 for i in range(8)], -1)   # (R, C/8, 8)
        return nib[:, :, order].reshape(t.shape[0], -1)

    out = {k: v.float() for k, v in raw.items() if not k.endswith(("qweight", "qzeros", "scales"))}
    for name in {k.rsplit(".", 1)[0] for k in raw if k.endswith(".qweight")}:
        q, z = unpack(raw[name + ".qweight"]), unpack(raw[name + ".qzeros"])      # (K, N), (K/G, N)
        s = raw[name + ".scales"].double().numpy()
        w = (q - np.repeat(z, G, 0)) * np.repeat(s, G, 0)                         # (K, N)
        out[name + ".weight"] = torch.from_numpy(w.T.copy()).float()
    return cfg, out


def test_awq_folder_layout(awq_dir):
    cfg = json.loads((awq_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 64,
                                          "zero_point": True, "version": "gemm",
                                          "modules_to_not_convert": None}
    t = load_file(str(awq_dir / "model.safetensors"))
    assert t["model.layers.0.self_attn.k_proj.qweight"].shape == (64, 32 // 8)   # (K, N/8)
    assert t["model.layers.1.mlp.down_proj.qzeros"].shape == (128 // 64, 64 // 8)
    assert t["model.layers.1.mlp.down_proj.scales"].dtype == torch.float16
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert (awq_dir / "tokenizer.json").is_file()
    log = json.loads((awq_dir / "quant_log.json").read_text())
    assert log["method"] == "awq" and len(log["groups"]) == 8


@torch.no_grad()
def test_int4_workspace_matches_hf_on_dequantized_weights(awq_dir, awq_ws):
    """labkit's W4A16 model on the converted workspace == HF transformers computing with the
    AWQ folder's weights decoded independently."""
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

    from labkit.models.llama import LlamaForCausalLM
    from labkit.workspace_ini import read_config_ini
    _, storage, _ = read_config_ini(awq_ws / "triton_models" / "weights")
    assert (storage["weight_type"], storage["group_size"]) == ("int4", 64)
    cfg, state = _independent_dequant(awq_dir)
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    cfg.update(dtype="float32", torch_dtype="float32")
    hf = HFLlama(LlamaConfig(**cfg)).float().eval()
    hf.load_state_dict(state, strict=False)
    ours = LlamaForCausalLM.from_pretrained(awq_ws)
    assert type(ours.layers[0].attention.w_qkv).__name__ == "W4A16Linear"
    ids = torch.randint(0, 49152, (2, 40))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_pipeline_serves_int4_workspace(awq_dir, awq_ws):
    """The engine (paged KV, CPU reference W4A16) greedily generates what HF generates with
    the same dequantized weights, from the workspace and from the AWQ folder (online)."""
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

    from labkit import EngineConfig, GenerationConfig, pipeline
    cfg, state = _independent_dequant(awq_dir)
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    hf = HFLlama(LlamaConfig(**cfg)).float().eval()
    hf.load_state_dict(state, strict=False)
    gc = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    for model in (awq_ws, awq_dir):
        pipe = pipeline(str(model), backend_config=EngineConfig(max_batch_size=2, session_len=256,
                                                                cache_max_entry_count=16, dtype="float32"))
        try:
            prompt = pipe.tokenizer.prompt_to_ids("Hello there")
            got = pipe("Hello there", gen_config=gc).token_ids
        finally:
            pipe.close()
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           min_new_tokens=8)[0, len(prompt):].tolist()
        assert got == want, model


def test_int4_tensors_split_like_the_weights_they_replace():
    """Column-parallel int4 tensors split rows, row-parallel ones split whole groups."""
    from labkit.config import ModelConfig
    from labkit.models.loader import shard
    cfg = ModelConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, vocab_size=64)
    full = {}
    for name, (n, k) in {"attention.w_qkv": (128, 64), "attention.wo": (64, 64),
                         "feed_forward.w1": (128, 64), "feed_forward.w2": (64, 128)}.items():
        full[f"layers.0.{name}.qweight"] = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        full[f"layers.0.{name}.scales"] = torch.rand(n, k // 32)
    parts = [shard(cfg, full, r, 2) for r in range(2)]
    assert parts[0]["layers.0.feed_forward.w2.scales"].shape == (64, 2)
    assert torch.equal(torch.cat([p["layers.0.attention.wo.qweight"] for p in parts], 1),
                       full["layers.0.attention.wo.qweight"])
    assert torch.equal(torch.cat([p["layers.0.feed_forward.w1.scales"] for p in parts], 0),
                       full["layers.0.feed_forward.w1.scales"])
    q0 = parts[0]["layers.0.attention.w_qkv.qweight"]                   # q rows 0-31, k 64-79, v 96-111
    qkv = full["layers.0.attention.w_qkv.qweight"]
    assert torch.equal(q0, torch.cat([qkv[0:32], qkv[64:80], qkv[96:112]]))


# ---------------------------------------------------------------------------- bad input
def test_group_size_not_dividing_is_a_clear_error(tmp_path):
    r = run_labkit("lite", "auto_awq", "tiny-llama", "--work-dir", tmp_path / "out",
                   "--w-group-size", "128")
    assert r.returncode == 2
    assert "w_group_size=128 is not allowed for this model" in r.stderr and "[32, 64]" in r.stderr
    assert not (tmp_path / "out").exists()


def test_already_quantized_inputs_are_refused(awq_dir, awq_ws, tmp_path):
    for model in (awq_dir, awq_ws):
        r = run_labkit("lite", "auto_awq", model, "--work-dir", tmp_path / "again")
        assert r.returncode == 2 and "already quantized" in r.stderr, r.stderr
    r = run_labkit("convert", awq_dir, "--model-format", "hf", "--dst-path", tmp_path / "ws")
    assert r.returncode == 2 and "already quantized (awq)" in r.stderr
    assert not (tmp_path / "again").exists() and not (tmp_path / "ws").exists()


def test_convert_awq_errors_leave_nothing(tiny_llama_dir, awq_dir, tmp_path):
    r = run_labkit("convert", tiny_llama_dir, "--model-format", "awq", "--dst-path", tmp_path / "a")
    assert r.returncode == 2 and "no AWQ quantization_config" in r.stderr
    broken = tmp_path / "broken"
    shutil.copytree(awq_dir, broken)
    t = load_file(str(broken / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.scales"]
    save_file(t, str(broken / "model.safetensors"))
    r = run_labkit("convert", broken, "--model-format", "awq", "--dst-path", tmp_path / "b")
    assert r.returncode == 2 and "model.layers.1.mlp.up_proj.scales" in r.stderr
    r = run_labkit("convert", awq_dir, "--dst-path", tmp_path / "c", "--tp", "2")
    assert r.returncode == 2 and "tp=2" in r.stderr                     # wo: 1 group per row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]

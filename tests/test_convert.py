"""Conversion into the TurboMind-style workspace: layout, config.ini, TP shards, atomicity."""
import configparser
import json

import pytest
import torch
from safetensors.torch import load_file

from labkit.config import ConfigError
from labkit.convert import ConversionError, convert, load, shard, weights_dir
from labkit.workspace_ini import read_config_ini, update_config_ini
from tests.helpers import workspace

SHAPE_FIELDS = ["model_name", "tensor_para_size", "head_num", "kv_head_num", "vocab_size",
                "num_layer", "inter_size", "norm_eps", "attn_bias", "start_id", "end_id",
                "session_len", "weight_type", "group_size", "rotary_embedding", "rope_theta",
                "size_per_head", "max_position_embeddings", "max_batch_size",
                "cache_max_entry_count", "cache_block_seq_len", "quant_policy",
                "rope_scaling_factor", "use_logn_attn"]


def test_bundled_workspace_layout():
    ws = workspace("smollm2-135m")
    w = weights_dir(ws)
    assert sorted(p.name for p in w.iterdir()) == ["config.ini", "conversion.json", "rank0.safetensors"]
    assert (ws / "triton_models" / "tokenizer" / "tokenizer.json").is_file()
    ini = configparser.ConfigParser()
    ini.read(w / "config.ini")
    sec = ini["llama"]
    for f in SHAPE_FIELDS:
        assert f in sec, f
    # The bundled model's real shape (SmolLM2-135M-Instruct) and the documented defaults.
    assert (sec["head_num"], sec["kv_head_num"], sec["num_layer"]) == ("9", "3", "30")
    assert (sec["vocab_size"], sec["size_per_head"], sec["inter_size"]) == ("49152", "64", "1536")
    assert (sec["max_batch_size"], sec["cache_max_entry_count"]) == ("64", "0.8")
    assert (sec["cache_block_seq_len"], sec["quant_policy"]) == ("64", "0")
    assert sec["session_len"] == sec["max_position_embeddings"] == "8192"
    tensors = load_file(str(w / "rank0.safetensors"))
    assert tensors["layers.0.attention.w_qkv.weight"].shape == ((9 + 2 * 3) * 64, 576)
    assert tensors["layers.29.feed_forward.w2.weight"].shape == (576, 1536)
    assert "output.weight" not in tensors          # tied to tok_embeddings


def _reassemble(cfg, shards):
    """Independent inverse of the TP split: concatenate the per-rank pieces."""
    tp = len(shards)
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        if "w_qkv" in name:
            q, kv = cfg.q_size // tp, cfg.kv_size // tp
            pieces = [p.split([q, kv, kv], 0) for p in parts]
            out[name] = torch.cat([torch.cat([pc[i] for pc in pieces], 0) for i in range(3)], 0)
        elif name.endswith(("w1.weight", "w3.weight")) or name == "output.weight":
            out[name] = torch.cat(parts, 0)
        elif name.endswith(("wo.weight", "w2.weight")):
            out[name] = torch.cat(parts, 1)
        else:
            assert all(torch.equal(parts[0], p) for p in parts[1:]), name
            out[name] = parts[0]
    return out


@pytest.mark.parametrize("model,tp", [("smollm2-135m", 3), ("tiny-llama", 2)])
def test_tp_shards_reassemble_exactly(model, tp):
    ws1, wsn = workspace(model, 1), workspace(model, tp)
    cfg, full = load(ws1)
    shards = [load_file(str(weights_dir(wsn) / f"rank{r}.safetensors")) for r in range(tp)]
    assert shards[0]["layers.0.attention.w_qkv.weight"].shape[0] == (cfg.q_size + 2 * cfg.kv_size) // tp
    merged = _reassemble(cfg, shards)
    assert merged.keys() == full.keys()
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    # A tp=1 workspace sliced at load time gives the same shards (TurboMind's runtime TP).
    for r in range(tp):
        _, sliced = load(ws1, rank=r, tp=tp)
        assert all(torch.equal(sliced[k], shards[r][k]) for k in shards[r])


def test_tp_must_divide_heads_and_nothing_is_written(tmp_path):
    dst = tmp_path / "ws"
    with pytest.raises(ConfigError, match=r"tp=2.*\[1, 3\]"):
        convert("smollm2-135m", dst, tp=2, progress=False)
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(tmp_path):
    dst = convert("tiny-llama", tmp_path / "ws", progress=False)
    before = {p: p.stat().st_mtime_ns for p in dst.rglob("*")}
    with pytest.raises(ConversionError, match="--overwrite"):
        convert("tiny-llama", dst, progress=False)
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*")} == before
    convert("tiny-llama-tied", dst, overwrite=True, progress=False)
    assert read_config_ini(weights_dir(dst))[0].tie_word_embeddings
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]      # no partial or old folders left


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    import labkit.convert as conv

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(conv, "write_config_ini", boom)
    with pytest.raises(RuntimeError):
        convert("tiny-llama", tmp_path / "ws", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_config_ini_edits(tmp_path):
    dst = convert("tiny-llama", tmp_path / "ws", progress=False, dtype="bf16")
    w = weights_dir(dst)
    assert read_config_ini(w)[1]["weight_type"] == "bf16"
    update_config_ini(w, max_batch_size=8, quant_policy=8)
    _, _, inference = read_config_ini(w)
    assert inference["max_batch_size"] == 8 and inference["quant_policy"] == 8
    text = (w / "config.ini").read_text()
    for old, new, field in [("quant_policy = 8", "quant_policy = 3", "quant_policy"),
                            ("head_num = 4", "head_num = 8", "head_num"),
                            ("max_batch_size = 8", "max_batch_size = many", "max_batch_size"),
                            ("quant_policy = 8", "quant_policy = 8\nbogus_knob = 1", "bogus_knob")]:
        (w / "config.ini").write_text(text.replace(old, new))
        with pytest.raises(ConfigError, match=field):
            read_config_ini(w)
    (w / "config.ini").write_text(text)
    with pytest.raises(ConfigError, match="fixed at conversion"):
        update_config_ini(w, head_num=8)
    assert json.loads((w / "conversion.json").read_text())["head_num"] == 4


def test_engine_arguments_override_config_ini(tmp_path):
    from labkit.config import EngineConfig
    from labkit.workspace_ini import resolve_engine_config
    dst = convert("tiny-llama", tmp_path / "ws", progress=False)
    update_config_ini(weights_dir(dst), max_batch_size=8, cache_block_seq_len=16)
    cfg, _, inference = read_config_ini(weights_dir(dst))
    resolved, notes = resolve_engine_config(EngineConfig(max_batch_size=4), inference, cfg)
    assert resolved.max_batch_size == 4 and resolved.cache_block_seq_len == 16
    assert resolved.session_len == cfg.max_position_embeddings
    assert any("max_batch_size = 4 from engine argument (config.ini had 8)" in n for n in notes)
    assert any("cache_block_seq_len = 16 from config.ini" in n for n in notes)


def test_shard_rejects_bad_rank():
    cfg, full = load("tiny-llama")
    with pytest.raises(ConfigError, match="rank"):
        shard(cfg, full, 2, 2)

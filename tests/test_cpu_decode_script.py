"""The CPU decode step's scripted layers (labkit/models/cpu_decode.py) against the Python layers
they mirror: the same engine and prompts run once with `script_cpu_decode` on and once off,
and every step's logits must be equal bit for bit (fp32, bf16, an int4 model), through batches
with ragged contexts, a batch of one whose blocks are scattered, and one whose blocks are
consecutive. Also: the scripted path is really taken, and it steps aside for a module hook,
logn scaling and the Triton backend; its oneDNN product is cpu_linear's."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

import labkit.models.cpu_decode as cpu_decode
from labkit.config import EngineConfig, GenerationConfig
from labkit.engine.engine import LLMEngine
from labkit.models.llama import LlamaForCausalLM


def _engine(model="smollm2-135m", dtype="float32", **kw):
    return LLMEngine(model, EngineConfig(device="cpu", dtype=dtype, cache_block_seq_len=16, **kw))


def _run(engine, prompts, lengths, scripted: bool, monkeypatch) -> tuple[list, int]:
    """Every decode step's logits, and how many steps the scripted layers ran."""
    monkeypatch.setattr(LlamaForCausalLM, "script_cpu_decode", scripted)
    model, logits, calls = engine.runner.model, [], [0]
    real_logits, real_layers = model.compute_logits, cpu_decode.scripted()
    assert real_layers is not None, "TorchScript compiled nothing"

    def record(hidden):
        out = real_logits(hidden)
        logits.append(out.clone())
        return out

    def counted(*args):
        calls[0] += 1
        return real_layers(*args)

    monkeypatch.setattr(model, "compute_logits", record)
    monkeypatch.setattr(cpu_decode, "scripted", lambda: counted)
    engine.reset_prefix_cache()
    outs = engine.generate(prompts, [GenerationConfig(max_new_tokens=n, ignore_eos=True)
                                     for n in lengths])
    monkeypatch.undo()
    return logits, calls[0], [o.token_ids for o in outs]


@pytest.mark.parametrize("model,dtype", [("smollm2-135m", "float32"), ("smollm2-135m", "bfloat16"),
                                         ("dummy:smollm2-135m:int4-g64", "bfloat16")])
def test_scripted_decode_is_the_python_path_bit_for_bit(model, dtype, monkeypatch):
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    engine = _engine(model, dtype)
    vocab = engine.model_config.vocab_size
    # ragged prompts crossing 16-token blocks; the longest request runs alone at the end, its
    # blocks scattered among the others'
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (21, 7, 35)]
    lengths = [6, 3, 24]
    want, n_python, tok_python = _run(engine, prompts, lengths, False, monkeypatch)
    got, n_script, tok_script = _run(engine, prompts, lengths, True, monkeypatch)
    assert n_python == 0 and n_script >= 20, (n_python, n_script)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i} differs (seed {seed})"
    assert tok_script == tok_python
    # a batch of one alone from the start: its blocks are consecutive (the view path)
    one = [torch.randint(0, vocab, (19,), generator=g).tolist()]
    want, _, _ = _run(engine, one, [8], False, monkeypatch)
    got, n_script, _ = _run(engine, one, [8], True, monkeypatch)
    assert n_script == 7 and all(torch.equal(a, b) for a, b in zip(got, want)), seed


def test_steps_aside_for_hooks_and_logn(monkeypatch):
    engine = _engine()
    model = engine.runner.model
    seen = []
    hook = model.layers[5].feed_forward.w2.register_forward_hook(lambda m, i, o: seen.append(1))
    _, n_script, _ = _run(engine, [[1, 2, 3, 4, 5]], [4], True, monkeypatch)
    hook.remove()
    assert n_script == 0 and len(seen) == 4            # the hook saw prefill and 3 decode steps
    _, n_script, _ = _run(engine, [[1, 2, 3, 4, 5]], [4], True, monkeypatch)
    assert n_script == 3                                # hook gone: scripted again
    model.logn.enabled = True
    _, n_script, _ = _run(engine, [[1, 2, 3, 4, 5]], [4], True, monkeypatch)
    assert n_script == 0


def test_replaced_layer_rebuilds_the_operands():
    """A linear replaced after a scripted step is picked up (the operands are keyed on it)."""
    from labkit.layers.linear import Linear
    engine = _engine()
    model = engine.runner.model
    engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=3))
    first = model._scripted_decode()
    old = model.layers[0].attention.wo
    new = Linear(old.in_features, old.out_features)
    new.weight = torch.nn.Parameter(old.weight.detach().clone(), requires_grad=False)
    model.layers[0].attention.wo = new
    assert model._scripted_decode() is not first


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_onednn_product_is_cpu_linears_call():
    """The ONEDNN kind calls what cpu_linear calls for bf16 on a CPU with native bf16; the
    types are checked by TorchScript here, the product compared where oneDNN runs fp32."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    w, x = torch.randn(48, 64, generator=g), torch.randn(3, 64, generator=g)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    want = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        linear = torch.jit.script(cpu_decode._linear)
    assert torch.equal(linear(x, cpu_decode.ONEDNN, packed, torch.empty(0), 0), want)
    assert torch.equal(linear(x, cpu_decode.MM, w.t(), torch.empty(0), 0), x @ w.t())

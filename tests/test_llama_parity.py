"""The reference Llama equals HF transformers' LlamaForCausalLM on the same weights (fp32, CPU).

The truth is HF's model in float64. Both fp32 models round differently over 30 layers (logits
~35, each off by 1e-4-ish from float64 on random ids), so an absolute bound on |ours - HF fp32|
was flaky (1 failure in a clean run); the test asks ours to be about as close to the float64
logits as HF's own fp32 is, or within fp32 noise of them, once with the same BLAS product as
HF and once with the oneDNN product the CPU engine uses."""
import copy

import pytest
import torch

from labkit.models.llama import LlamaForCausalLM
from tests.helpers import hf_model, workspace


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-llama", "tiny-llama-tied"])
@pytest.mark.parametrize("product", ["sgemm", "onednn"])
def test_logits_match_hf(model, product, monkeypatch):
    """sgemm: fp32 products through F.linear's BLAS, as HF's: the model's math, held to HF's own
    rounding. onednn: the products the CPU engine runs on x86 (labkit/layers/cpu_linear.py),
    whose fp32 sums round 2-4x more than sgemm's (|error| vs float64, 40 seeds on SmolLM2:
    median 1.6e-4 vs 0.9e-4, max 2.0e-3 vs 3.3e-4; up to 12.6x HF's on one seed; 4.0e-3 on
    seed 1268208837), held to a fixed bound below a real bug's error."""
    import labkit.layers.cpu_linear as cl
    if product == "onednn" and not cl.FP32_AVAILABLE:
        pytest.skip("the fp32 oneDNN path is off here (not x86, or LABKIT_ONEDNN_FP32=0)")
    if product == "sgemm":
        monkeypatch.setattr(cl, "FP32_AVAILABLE", False)
    ours = LlamaForCausalLM.from_pretrained(workspace(model))
    ref = hf_model(model)
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ref.config.vocab_size, (2, 29), generator=g)   # fresh each run
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
        truth = copy.deepcopy(ref).double()(ids).logits                  # (2, 29, V) float64
    assert a.shape == b.shape == (2, 29, ref.config.vocab_size)
    err_ours = (a.double() - truth).abs().max().item()
    err_hf = (b.double() - truth).abs().max().item()                     # HF's own fp32 rounding
    # fp32 noise with sgemm: 0.6-3.3e-4 from float64 here, ours/HF's ratio 0.7-2.3; a real bug
    # (RoPE, norm, a bf16 cast) is 1e-2 or more (a bf16 cast: ~1e-1 on logits of ~35)
    # oneDNN: 2x the worst seen (4.0e-3, on the seed that failed a clean run at the old bound)
    bound = max(4 * err_hf, 5e-4) if product == "sgemm" else 8e-3
    assert err_ours <= bound, \
        f"max |ours - HF fp64| = {err_ours}, HF fp32's = {err_hf} ({product}, seed {seed})"


def test_online_conversion_equals_workspace():
    """Loading straight from the .gguf (online) and from the workspace give the same model."""
    a = LlamaForCausalLM.from_pretrained("tiny-llama")
    b = LlamaForCausalLM.from_pretrained(workspace("tiny-llama"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n

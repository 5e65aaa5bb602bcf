"""The reference Llama equals HF transformers' LlamaForCausalLM on the same weights (fp32, CPU)."""
import pytest
import torch

from labkit.models.llama import LlamaForCausalLM
from tests.helpers import hf_model, workspace


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-llama", "tiny-llama-tied"])
def test_logits_match_hf(model):
    ours = LlamaForCausalLM.from_pretrained(workspace(model))
    ref = hf_model(model)
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ref.config.vocab_size, (2, 29), generator=g)   # fresh each run
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert a.shape == b.shape == (2, 29, ref.config.vocab_size)
    err = (a - b).abs().max().item()
    assert err < 1e-4, f"max |ours - HF| = {err} (seed {seed})"


def test_online_conversion_equals_workspace():
    """Loading straight from the .gguf (online) and from the workspace give the same model."""
    a = LlamaForCausalLM.from_pretrained("tiny-llama")
    b = LlamaForCausalLM.from_pretrained(workspace("tiny-llama"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n

"""`labkit lite calibrate`: activation statistics of a model on calibration text.

What it measures, per layer (the lesson's offline flow, as lmdeploy's `lite calibrate`):
- the input of every Linear (w_qkv, wo, w13, w2), per input channel: max, min, absmax, mean
  (what weight quantization such as AWQ scales by);
- K (after RoPE, as the cache holds it) and V per (KV head, channel): max, min, absmax, mean
  (what static KV-cache parameters are made of: `labkit lite kv_qparams`). K is measured
  unsmoothed: a workspace's `labkit lite k_smooth` factors are multiplied back in.

Layer by layer: the hidden states of all samples pass through layer 0, its statistics are
taken, then layer 1, ... so only one layer's activations are alive at a time (a sample at a
time inside a layer). Text: the pydoc corpus after the tokens perplexity is scored on
(labkit/corpus.py). Output, each file written atomically (`torch.load(weights_only=True)`):

    WORK_DIR/inputs_stats.pth   {stat: {"layers.{i}.attention.w_qkv": (in_features,), ...}}
    WORK_DIR/key_stats.pth      {stat: (layers, kv_heads, head_dim), "meta": {...}}
    WORK_DIR/value_stats.pth    {stat: (layers, kv_heads, head_dim), "meta": {...}}
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from labkit import interrupt
from labkit.corpus import EVAL_TOKENS, pydoc_text, token_chunks

log = logging.getLogger("labkit")
STATS = ("max", "min", "absmax", "mean")
FILES = ("inputs_stats.pth", "key_stats.pth", "value_stats.pth")


class RunningStats:
    """max, min, absmax and mean over rows of x (..., *shape), per element of shape."""

    def __init__(self):
        self.max = self.min = self.absmax = self.sum = None
        self.count = 0

    def update(self, x: torch.Tensor, keep: int) -> None:
        x = x.detach().float().reshape(-1, *x.shape[x.dim() - keep:])        # (rows, *shape)
        mx, mn, am, sm = x.amax(0), x.amin(0), x.abs().amax(0), x.sum(0)
        if self.max is None:
            self.max, self.min, self.absmax, self.sum = mx, mn, am, sm
        else:
            self.max, self.min = torch.maximum(self.max, mx), torch.minimum(self.min, mn)
            self.absmax, self.sum = torch.maximum(self.absmax, am), self.sum + sm
        self.count += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {"max": self.max.cpu(), "min": self.min.cpu(), "absmax": self.absmax.cpu(),
                "mean": (self.sum / self.count).cpu()}


@torch.inference_mode()
def calibrate(model, work_dir, calib_samples: int = 128, calib_seqlen: int = 2048,
              device: str = "cpu", progress: bool = True) -> Path:
    """Run the calibration text through `model` layer by layer and save the statistics."""
    from tqdm.auto import tqdm

    from labkit.layers.linear import Linear
    from labkit.models.llama import LlamaForCausalLM
    from labkit.models.loader import inspect_model
    from labkit.tokenizer import Tokenizer

    if calib_samples < 1 or calib_seqlen < 2:
        from labkit.config import ConfigError
        raise ConfigError(f"calib_samples={calib_samples}, calib_seqlen={calib_seqlen} are not "
                         f"allowed: --calib-samples must be >= 1 and --calib-seqlen >= 2")
    info = inspect_model(model)
    ids = Tokenizer(info.tokenizer_dir).encode(pydoc_text())
    samples = token_chunks(ids, calib_seqlen, calib_samples, start=EVAL_TOKENS,
                           what="calibration text (the pydoc corpus after the perplexity tokens)")
    if samples.shape[0] < calib_samples:
        log.info("calibration text holds %d samples of %d tokens; using %d (asked for %d)",
                 samples.shape[0], calib_seqlen, samples.shape[0], calib_samples)
    net = LlamaForCausalLM.from_pretrained(model, device=device,
                                           max_positions=max(calib_seqlen, 1))
    cfg = net.cfg
    smooth = None                    # K statistics are of the unsmoothed K (labkit/quant/k_smooth.py)
    if info.workspace is not None:
        from labkit.models.loader import weights_dir
        from labkit.quant.k_smooth import read_k_smooth
        found = read_k_smooth(weights_dir(info.workspace), cfg)
        smooth = None if found is None else found[0].to(device)           # (L, Hkv, D)
    samples = samples.to(device)                                          # (S, L)
    positions = torch.arange(calib_seqlen, device=device)[None]           # (1, L)
    hidden = net.tok_embeddings(samples)                                  # (S, L, H)
    residual = None
    inputs: dict[str, RunningStats] = {}
    keys, values = [], []
    for i, layer in enumerate(tqdm(net.layers, desc=f"calibrate {len(samples)} x {calib_seqlen}",
                                   disable=not progress)):
        k_stats, v_stats = RunningStats(), RunningStats()
        c = None if smooth is None else smooth[i]

        def kv_hook(module, args, c=c):                                   # args: q, k, v, md
            k_stats.update(args[1] if c is None else args[1] * c, 2)      # per (Hkv, D)
            v_stats.update(args[2], 2)
        hooks = [layer.attention.attn.register_forward_pre_hook(kv_hook)]
        for name, mod in layer.named_modules():
            if isinstance(mod, Linear):
                st = inputs.setdefault(f"layers.{i}.{name}", RunningStats())
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, st=st: st.update(args[0], 1)))        # (in_features,)
        out, res = [], []
        for s in range(samples.shape[0]):                                 # one sample at a time
            r = None if residual is None else residual[s:s + 1]
            o, r = layer(hidden[s:s + 1], r, positions, None)             # (1, L, H) x2
            out.append(o)
            res.append(r)
        hidden, residual = torch.cat(out), torch.cat(res)                 # (S, L, H) x2
        for h in hooks:
            h.remove()
        keys.append(k_stats.result())
        values.append(v_stats.result())
    meta = {"model": str(model), "samples": int(samples.shape[0]), "seqlen": calib_seqlen,
            "num_layer": cfg.num_layers, "kv_head_num": cfg.num_kv_heads,
            "size_per_head": cfg.head_dim}
    kv = {name: {s: torch.stack([x[s] for x in per_layer]) for s in STATS} | {"meta": meta}
          for name, per_layer in (("key", keys), ("value", values))}     # (L, Hkv, D) each
    ins = {s: {name: st.result()[s] for name, st in inputs.items()} for s in STATS}
    return _save_atomically(work_dir, {"inputs_stats.pth": ins, "key_stats.pth": kv["key"],
                                       "value_stats.pth": kv["value"]})


def _save_atomically(work_dir, files: dict) -> Path:
    """Write every file into a hidden sibling folder first, then move each into place."""
    dst = Path(work_dir).absolute()
    tmp = dst.parent / f".{dst.name}.calibrate-partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, obj in files.items():
            torch.save(obj, tmp / name)
        interrupt.check()        # a SIGTERM that arrived while saving: publish nothing
        dst.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(tmp / name, dst / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def load_kv_stats(work_dir) -> dict:
    """{"key": {stat: (L, Hkv, D)}, "value": ...} from a calibrate work dir (clear errors)."""
    from labkit.quant.kv_qparams import KVQParamsError
    d = Path(work_dir)
    out = {}
    for which in ("key", "value"):
        path = d / f"{which}_stats.pth"
        if not path.is_file():
            raise KVQParamsError(f"{path} is missing: run `labkit lite calibrate MODEL "
                                 f"--work-dir {work_dir}` first")
        try:
            st = torch.load(path, weights_only=True, map_location="cpu")
            out[which] = {s: st[s] for s in STATS}
        except Exception as e:
            raise KVQParamsError(f"{path} is not a statistics file of `labkit lite calibrate` "
                                 f"({type(e).__name__}: {e})") from None
    return out

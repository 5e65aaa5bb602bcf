"""config.ini of a TurboMind-style workspace: read, write, validate.

The file has one `[llama]` section with TurboMind's field names. Two kinds of fields:
- model-shape fields are fixed at conversion. A copy of them is kept in `conversion.json`
  beside config.ini, so an edited one is caught and named ("re-run labkit convert").
- inference fields (INFERENCE_DEFAULTS) are the knobs students edit; explicit engine
  arguments override them, and `resolve_engine_config` says which value won.
"""
from __future__ import annotations

import configparser
import dataclasses
import json
import logging
from pathlib import Path

from labkit.config import (INFERENCE_DEFAULTS, ConfigError, EngineConfig, ModelConfig,
                           validate_inference_fields)

log = logging.getLogger("labkit")
SECTION = "llama"
SHAPE_RECORD = "conversion.json"

# TurboMind field name -> (ModelConfig attribute, type). tensor_para_size, weight_type and
# group_size describe the stored weights rather than the model, so they are handled apart.
SHAPE_FIELDS = {
    "head_num": ("num_heads", int),
    "kv_head_num": ("num_kv_heads", int),
    "size_per_head": ("head_dim", int),
    "hidden_units": ("hidden_size", int),
    "vocab_size": ("vocab_size", int),
    "num_layer": ("num_layers", int),
    "inter_size": ("intermediate_size", int),
    "norm_eps": ("rms_norm_eps", float),
    "attn_bias": ("attn_bias", bool),
    "start_id": ("bos_token_id", int),
    "end_id": ("eos_token_id", int),
    "rope_theta": ("rope_theta", float),
    "max_position_embeddings": ("max_position_embeddings", int),
    "tie_word_embeddings": ("tie_word_embeddings", bool),
}
STORAGE_FIELDS = {"tensor_para_size": int, "weight_type": str, "group_size": int,
                  "rotary_embedding": int}
EDITABLE_TEXT_FIELDS = {"model_name": str}
WEIGHT_TYPES = ("fp32", "fp16", "bf16", "int4")


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _parse(name: str, raw: str, typ):
    try:
        if typ is bool:
            if raw.strip() not in ("0", "1"):
                raise ValueError
            return raw.strip() == "1"
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        return raw.strip()
    except ValueError:
        allowed = {bool: "0 or 1", int: "an integer", float: "a number"}.get(typ, "text")
        raise ConfigError(f"config.ini: {name}={raw!r} is not allowed: {name} must be {allowed}")


def _parse_inference(name: str, raw: str):
    typ = {"cache_max_entry_count": float, "rope_scaling_factor": float,
           "use_logn_attn": bool}.get(name, int)
    v = _parse(name, raw, typ)
    if name == "cache_max_entry_count" and v > 1 and float(v).is_integer():
        v = int(v)
    return v


def write_config_ini(path: Path, cfg: ModelConfig, *, tp: int, weight_type: str,
                     session_len: int | None = None, group_size: int = 0, **inference) -> None:
    """Write config.ini (and the conversion.json shape record) into the weights folder `path`."""
    path = Path(path)
    values = {"model_name": cfg.model_name, "tensor_para_size": tp, "weight_type": weight_type,
              "group_size": group_size, "rotary_embedding": cfg.head_dim}
    for ini_name, (attr, _) in SHAPE_FIELDS.items():
        values[ini_name] = getattr(cfg, attr)
    inf = dict(INFERENCE_DEFAULTS)
    inf["session_len"] = session_len or cfg.max_position_embeddings
    inf.update({k: v for k, v in inference.items() if v is not None})
    validate_inference_fields(inf)
    values.update(inf)
    parser = configparser.ConfigParser()
    parser[SECTION] = {k: _fmt(v) for k, v in values.items()}
    with open(path / "config.ini", "w") as f:
        parser.write(f)
    shape = {k: values[k] for k in list(SHAPE_FIELDS) + list(STORAGE_FIELDS)}
    (path / SHAPE_RECORD).write_text(json.dumps(shape, indent=1) + "\n")


def read_config_ini(path: Path) -> tuple[ModelConfig, dict, dict]:
    """Read `path` (a weights folder or a config.ini). Returns (model config, storage fields
    {tensor_para_size, weight_type, group_size}, inference fields). Raises ConfigError naming
    the field for an unknown field, a bad value or an edited model-shape field."""
    path = Path(path)
    ini = path if path.name == "config.ini" else path / "config.ini"
    if not ini.is_file():
        raise ConfigError(f"{ini}: no config.ini here; is this a workspace made by `labkit convert`?")
    parser = configparser.ConfigParser()
    try:
        parser.read(ini)
    except configparser.Error as e:
        raise ConfigError(f"{ini}: cannot parse: {e}".splitlines()[0])
    if SECTION not in parser:
        raise ConfigError(f"{ini}: no [{SECTION}] section")
    raw = dict(parser[SECTION])
    known = set(SHAPE_FIELDS) | set(STORAGE_FIELDS) | set(EDITABLE_TEXT_FIELDS) | set(INFERENCE_DEFAULTS)
    for name in raw:
        if name not in known:
            raise ConfigError(f"config.ini: unknown field {name!r}; allowed fields: {sorted(known)}")
    missing = [n for n in list(SHAPE_FIELDS) + list(STORAGE_FIELDS) if n not in raw]
    if missing:
        raise ConfigError(f"config.ini: missing model field(s) {missing}; re-run `labkit convert`")

    shape = {n: _parse(n, raw[n], t) for n, (_, t) in SHAPE_FIELDS.items()}
    storage = {n: _parse(n, raw[n], t) for n, t in STORAGE_FIELDS.items()}
    record_file = ini.parent / SHAPE_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        for n, v in {**shape, **storage}.items():
            if n in record and record[n] != v:
                raise ConfigError(
                    f"config.ini: {n} was changed from {record[n]!r} to {v!r}; model-shape fields "
                    f"are fixed at conversion (the weights have that shape). Edit only "
                    f"{sorted(INFERENCE_DEFAULTS)}, or re-run `labkit convert` to change the model")
    if storage["weight_type"] not in WEIGHT_TYPES:
        raise ConfigError(f"config.ini: weight_type={storage['weight_type']!r} is not allowed: "
                          f"weight_type must be one of {list(WEIGHT_TYPES)}")
    inference = {n: _parse_inference(n, raw[n]) for n in INFERENCE_DEFAULTS if n in raw}
    try:
        validate_inference_fields(inference)
    except ConfigError as e:
        raise ConfigError(f"config.ini: {e}")
    model = ModelConfig(**{SHAPE_FIELDS[n][0]: v for n, v in shape.items()},
                        model_name=raw.get("model_name", "llama").strip())
    return model, storage, inference


def update_config_ini(path: Path, **fields) -> None:
    """Edit inference fields of an existing config.ini in place (validated first)."""
    path = Path(path)
    ini = path if path.name == "config.ini" else path / "config.ini"
    bad = [k for k in fields if k not in INFERENCE_DEFAULTS and k not in EDITABLE_TEXT_FIELDS]
    if bad:
        raise ConfigError(f"{bad[0]} is fixed at conversion; editable fields: "
                          f"{sorted(INFERENCE_DEFAULTS) + list(EDITABLE_TEXT_FIELDS)}")
    validate_inference_fields({k: v for k, v in fields.items() if k in INFERENCE_DEFAULTS})
    parser = configparser.ConfigParser()
    parser.read(ini)
    for k, v in fields.items():
        parser[SECTION][k] = _fmt(v)
    with open(ini, "w") as f:
        parser.write(f)


def resolve_engine_config(engine: EngineConfig | None, ini_fields: dict,
                          model: ModelConfig) -> tuple[EngineConfig, list[str]]:
    """Merge: explicit engine argument > config.ini > default. Returns the resolved config
    and one line per knob saying which value won (the engine logs them)."""
    engine = engine or EngineConfig()
    resolved, notes = {}, []
    for name, default in INFERENCE_DEFAULTS.items():
        if name == "session_len" and default is None:
            default = model.max_position_embeddings
        arg, ini = getattr(engine, name), ini_fields.get(name)
        if arg is not None:
            resolved[name] = arg
            src = "engine argument" + (f" (config.ini had {ini!r})" if ini is not None and ini != arg else "")
        elif ini is not None:
            resolved[name], src = ini, "config.ini"
        else:
            resolved[name], src = default, "default"
        notes.append(f"{name} = {resolved[name]!r} from {src}")
    for n in notes:
        log.info(n)
    return dataclasses.replace(engine, **resolved), notes

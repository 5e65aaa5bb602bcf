"""labkit: a small, real LLM inference engine for the LMDeploy/TurboMind deployment course.

    from labkit import pipeline, EngineConfig, GenerationConfig

`pipeline` is imported eagerly: it shares its name with the module labkit/pipeline.py, and
an eager import keeps `labkit.pipeline` the function. Other names are imported on first use.
"""
__version__ = "0.1.0"

from labkit.config import EngineConfig, GenerationConfig  # noqa: E402  (light: no torch)
from labkit.pipeline import pipeline  # noqa: E402

_EXPORTS = {
    "Pipeline": "labkit.pipeline", "Response": "labkit.pipeline",
    "Session": "labkit.pipeline",
    "EngineConfig": "labkit.config", "GenerationConfig": "labkit.config",
    "ModelConfig": "labkit.config", "ConfigError": "labkit.config",
    "LLMEngine": "labkit.engine.engine", "AsyncEngine": "labkit.engine.async_engine",
}
__all__ = sorted(_EXPORTS) + ["pipeline"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")

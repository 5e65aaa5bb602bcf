"""labkit: a small, real LLM inference engine for the LMDeploy/TurboMind deployment course.

    from labkit import pipeline, EngineConfig, GenerationConfig

Names are imported lazily so `import labkit` (and the CLI) start fast.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "pipeline": "labkit.pipeline", "Pipeline": "labkit.pipeline", "Response": "labkit.pipeline",
    "Session": "labkit.pipeline",
    "EngineConfig": "labkit.config", "GenerationConfig": "labkit.config",
    "ModelConfig": "labkit.config", "ConfigError": "labkit.config",
    "LLMEngine": "labkit.engine.engine", "AsyncEngine": "labkit.engine.async_engine",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")

"""The engine: Sequence, BlockManager, Scheduler, ModelRunner, Sampler, LLMEngine, AsyncEngine."""

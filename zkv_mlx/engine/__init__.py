"""The engine: sequences, scheduler, model runner, sampler and the engine thread."""

from .engine import Engine, EngineThread, Event, RequestHandle
from .sequence import SamplingParams, Sequence

__all__ = ["Engine", "EngineThread", "Event", "RequestHandle", "SamplingParams", "Sequence"]

"""The engine: sequences, scheduler, model runner, sampler and the engine thread."""

from .engine import Engine, Event, InFlight
from .sequence import SamplingParams, Sequence
from .thread import EngineThread, RequestHandle

__all__ = ["Engine", "EngineThread", "Event", "InFlight", "RequestHandle", "SamplingParams", "Sequence"]

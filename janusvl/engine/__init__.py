"""The serving engine: one loop that owns the model and steps every request (see engine.py)."""

from .engine import Engine
from .metrics import Metrics
from .requests import ChatRequest, Delta, Failed, Finished, ImageRequest, ImagesDone, Progress, RowDone
from .stats import EngineStats

__all__ = ["Engine", "EngineStats", "Metrics", "ChatRequest", "ImageRequest", "Delta", "RowDone", "Progress",
           "ImagesDone", "Finished", "Failed"]

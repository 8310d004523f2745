"""Inference: logits processing (sampling.py), text and stop handling (text.py) and the one decode engine
(engine.py) that chat, generate and the server run on."""

from rwkvctl.generate.engine import DecodeSettings, Generation, InferenceEngine, Piece, generate, ingest
from rwkvctl.generate.sampling import Penalties, PenaltyTracker, SamplingConfig, sample
from rwkvctl.generate.text import StopTexts, TextStream

__all__ = [
    "DecodeSettings",
    "Generation",
    "InferenceEngine",
    "Penalties",
    "PenaltyTracker",
    "Piece",
    "SamplingConfig",
    "StopTexts",
    "TextStream",
    "generate",
    "ingest",
    "sample",
]

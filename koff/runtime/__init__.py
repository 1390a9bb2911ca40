from koff.runtime.generation import BatchGeneration, DecodeBatch, GenerationError, Sampling, TextStream
from koff.runtime.runtime import KoffRuntime, MemoryLoadError, load

__all__ = [
    "BatchGeneration", "DecodeBatch", "GenerationError", "KoffRuntime", "MemoryLoadError", "Sampling", "TextStream", "load",
]

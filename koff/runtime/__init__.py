from koff.runtime.generation import BatchGeneration, DecodeBatch, GenerationError, Sampling, TextStream
from koff.runtime.runtime import AUTO, KoffRuntime, MemoryLoadError, load

__all__ = [
    "AUTO", "BatchGeneration", "DecodeBatch", "GenerationError", "KoffRuntime", "MemoryLoadError", "Sampling", "TextStream", "load",
]

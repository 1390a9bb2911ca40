from koff.runtime.generation import BatchGeneration, DecodeBatch, Sampling, TextStream
from koff.runtime.runtime import KoffRuntime, MemoryLoadError, load

__all__ = ["BatchGeneration", "DecodeBatch", "KoffRuntime", "MemoryLoadError", "Sampling", "TextStream", "load"]

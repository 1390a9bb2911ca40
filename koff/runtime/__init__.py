from koff.runtime.generation import BatchGeneration, Sampling, TextStream
from koff.runtime.runtime import KoffRuntime, MemoryLoadError, load

__all__ = ["BatchGeneration", "KoffRuntime", "MemoryLoadError", "Sampling", "TextStream", "load"]

from koff.config import DecomposeConfig
from koff.training.trainer import Decomposer

__all__ = ["DecomposeConfig", "Decomposer"]

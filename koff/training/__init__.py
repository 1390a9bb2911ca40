from koff.config import DecomposeConfig
from koff.training.pipeline import decompose, train_or_resume
from koff.training.trainer import Decomposer

__all__ = ["DecomposeConfig", "Decomposer", "decompose", "train_or_resume"]

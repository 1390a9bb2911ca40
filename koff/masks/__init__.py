from koff.masks.binary import BinaryMask, select_uniform_units, select_units
from koff.masks.hard_concrete import HardConcreteGates
from koff.masks.hooks import GateHooks
from koff.masks.learned import LearnedMask, SparsityConstraint, target_schedule
from koff.masks.oneshot import IMPORTANCES, oneshot_mask, unit_importance
from koff.masks.units import UnitCosts

__all__ = [
    "BinaryMask",
    "GateHooks",
    "HardConcreteGates",
    "IMPORTANCES",
    "LearnedMask",
    "SparsityConstraint",
    "UnitCosts",
    "oneshot_mask",
    "select_uniform_units",
    "select_units",
    "target_schedule",
    "unit_importance",
]

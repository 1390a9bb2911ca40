"""Analyses of a decomposition run (which neurons the shared mask removes, and why it matters)."""

from koff.analysis.lape import (
    NeuronClasses,
    activation_probabilities,
    activity_strata,
    adjusted_enrichment,
    classify,
    fire_counts,
    language_rates,
    lape_scores,
    removal_rates,
    spread_blocks,
)
from koff.analysis.outliers import outlier_neurons

__all__ = [
    "NeuronClasses",
    "activation_probabilities",
    "activity_strata",
    "adjusted_enrichment",
    "classify",
    "fire_counts",
    "language_rates",
    "lape_scores",
    "outlier_neurons",
    "removal_rates",
    "spread_blocks",
]

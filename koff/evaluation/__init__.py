from koff.evaluation.decomposition import DecompositionEval, evaluate_decomposition
from koff.evaluation.perplexity import DomainPerplexity, Scorer, domain_perplexity, evaluate, hf_scorer

__all__ = [
    "DecompositionEval", "DomainPerplexity", "evaluate_decomposition", "Scorer", "domain_perplexity", "evaluate", "hf_scorer",
]

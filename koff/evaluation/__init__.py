from koff.evaluation.perplexity import DomainPerplexity, Scorer, domain_perplexity, evaluate, hf_scorer, token_nll_sum

__all__ = ["DomainPerplexity", "Scorer", "domain_perplexity", "evaluate", "hf_scorer", "token_nll_sum"]

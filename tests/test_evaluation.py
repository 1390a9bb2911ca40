import math

import torch

from koff.data import DomainSpec, load_domain
from koff.evaluation import evaluate, hf_scorer
from tiny import tiny_model


def test_perplexity_matches_hand_computed_loss(tokenizer, corpus):
    model = tiny_model("llama")
    data = load_domain(DomainSpec("eng", str(corpus["eng"])), tokenizer, block_len=16, val_fraction=0.3)
    result = evaluate(hf_scorer(model), [data], batch_size=3, progress=False)["domains"]["eng"]
    with torch.no_grad():
        # HF's own loss, one block at a time; blocks are equal length so the mean is token-weighted.
        losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in data.val]
    assert result["tokens"] == data.val.shape[0] * 15
    assert math.isclose(result["nll"], sum(losses) / len(losses), rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)


def test_evaluate_reports_means(tokenizer, corpus):
    model = tiny_model("qwen2")
    domains = [load_domain(DomainSpec(n, str(corpus[n])), tokenizer, block_len=16) for n in ("eng", "code")]
    result = evaluate(hf_scorer(model), domains, progress=False, max_blocks=2)
    ppls = [result["domains"][n]["perplexity"] for n in ("eng", "code")]
    assert result["domains"]["eng"]["tokens"] == 2 * 15
    assert math.isclose(result["mean_perplexity"], sum(ppls) / 2)
    assert math.isclose(result["geomean_perplexity"], math.sqrt(ppls[0] * ppls[1]))

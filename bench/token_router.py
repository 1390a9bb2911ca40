"""What the export's token router should learn from: accuracy of `model: "auto"`'s unigram router
built from 32 spread training blocks per memory (as export built it before), from every training
block (as it builds it now), and a discriminatively tuned variant (logistic regression over the same
(memories x vocabulary) table, started from the naive-Bayes weights and trained on random 8-128-token
windows of the training blocks). No model is loaded: the router needs only the tokenizer.

The memories are configs/smollm2-real.yaml's (Debian's reference manual in four languages, Python's
standard library, as its run splits them); the prompts are the first 16, 64 or 256 tokens of 32
evenly spaced blocks per domain of its validation split and of its held-out text of another source
and another genre (`python scripts/real_corpora.py --out corpora` writes them).

    python bench/token_router.py        # about 3 minutes on 2 cores

Writes bench/results/NAME.json and .md (NAME: --name, token-router) with the command, machine and commit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import command_line, git_commit, machine, named_config
from koff.data import load_domain, load_heldout, parse_domain
from koff.experiments.ablation import source_label
from koff.io import markdown_table, write_json, write_text
from koff.models import load_tokenizer
from koff.models.loader import model_folder
from koff.routing import TokenRouter, spread

PROMPT_LENGTHS = (16, 64, 256)
BLOCKS = 32


def accuracy(weights: torch.Tensor, bias: torch.Tensor, names: list[str], sets: dict) -> dict:
    """Per set and prompt length: % of prompts whose best-scoring memory is their domain's."""
    out = {}
    for label, blocks in sets.items():
        for length in PROMPT_LENGTHS:
            right = total = 0
            for i, name in enumerate(names):
                prompts = blocks[name][:, :length].long()
                right += int(((weights[:, prompts].mean(-1).T + bias).argmax(1) == i).sum())
                total += len(prompts)
            out[f"{label} @{length}"] = round(100 * right / total, 1)
    return out


def tuned(start: torch.Tensor, train: dict[str, torch.Tensor], steps: int = 400, l2: float = 1e-2,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression on the mean of each window's token weights, pulled towards ``start``."""
    gen = torch.Generator().manual_seed(seed)
    weights, bias = start.clone().requires_grad_(True), torch.zeros(len(train), requires_grad=True)
    opt = torch.optim.Adam([weights, bias], lr=0.05)
    for _ in range(steps):
        length = int(torch.randint(8, 129, (1,), generator=gen))
        windows, labels = [], []
        for i, blocks in enumerate(train.values()):
            rows = torch.randint(0, len(blocks), (32,), generator=gen).tolist()
            starts = torch.randint(0, blocks.shape[1] - length + 1, (32,), generator=gen).tolist()
            windows.append(torch.stack([blocks[r, s:s + length] for r, s in zip(rows, starts)]).long())
            labels.append(torch.full((32,), i))
        logits = weights[:, torch.cat(windows)].mean(-1).T + bias
        loss = torch.nn.functional.cross_entropy(logits, torch.cat(labels)) + l2 * ((weights - start) ** 2).sum() / len(train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weights.detach(), bias.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="token-router")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    config = named_config("smollm2-real")
    tokenizer = load_tokenizer(model_folder(config["model"])[0])
    domains = {d.name: load_domain(d, tokenizer, 256, 0.1, 0) for d in map(parse_domain, config["domain"])}
    names = sorted(domains)
    sets = {"validation": {n: torch.stack(spread(d.val, BLOCKS)) for n, d in domains.items()}}
    for spec in map(parse_domain, config["heldout"]):
        label = source_label(spec.source)
        label = {"python-site": "maint-guide", "python-examples": "debian-history"}.get(label, label)
        sets.setdefault(label, {})[spec.name] = load_heldout(spec, tokenizer, 256, BLOCKS).val
    vocabulary = len(tokenizer)

    def naive_bayes(count: int | None) -> torch.Tensor:
        texts = {n: spread(domains[n].train, count or domains[n].train.shape[0]) for n in names}
        return TokenRouter.build(texts, vocabulary).log_probs

    zero = torch.zeros(len(names))
    rows = {"counts of 32 spread blocks per memory": accuracy(naive_bayes(BLOCKS), zero, names, sets),
            "counts of every training block (the export's)": accuracy(naive_bayes(None), zero, names, sets)}
    train = {n: domains[n].train for n in names}
    for l2 in (1e-2, 1e-4):
        rows[f"tuned from every block's counts, l2 {l2}"] = accuracy(*tuned(naive_bayes(None), train, l2=l2), names, sets)
    for name, row in rows.items():
        print(name, row)
    columns = list(next(iter(rows.values())))
    table = markdown_table(["router", *columns], [[name, *[f"{row[c]}%" for c in columns]] for name, row in rows.items()])
    result = {"name": args.name, "command": command_line(), "machine": machine(), "commit": git_commit(),
              "sets": {label: {n: len(b) for n, b in blocks.items()} for label, blocks in sets.items()},
              "training_blocks": {n: d.train.shape[0] for n, d in domains.items()}, "accuracy": rows}
    out = Path(args.results)
    write_json(out / f"{args.name}.json", result)
    write_text(out / f"{args.name}.md", "\n".join([
        f"# {args.name}", "", f"`{result['command']}`", "", f"{result['machine']}, commit {result['commit']}", "",
        f"The token router's accuracy (% of prompts routed to their folder's memory), {BLOCKS} blocks per domain and "
        "set; 'maint-guide' holds python-site's Python, 'debian-history' python-examples':", "", table, ""]))
    print(table)


if __name__ == "__main__":
    main()

"""Benchmark for `model: "auto"`: which router picks memories best, what routing costs a request.

On an export of the embedded model (the run's memories: four languages and Python), for the held-out
validation blocks and for text of another source and genre (Debian's manuals and Python's standard
library, from `python scripts/real_corpora.py --out corpora`), the prompt being each block's first
16, 64 or 256 tokens:

* the export's router: a unigram model of each memory's training tokens (no forward pass);
* the hidden-state router (nearest mean of the backbone's mean-pooled hidden state) at an eighth, a
  quarter, a half and the last of its depth;
* the likelihood router: the memory under which the prompt is most likely (one forward per memory);
* accuracy per domain, and perplexity of each block with the routed memory (from its first 64
  tokens) over the right one, the bare backbone's and every wrong memory's (koff eval --routing);
* routing latency per request (ms) and its share of the time to first token.

    python bench/routing.py [--run bench/out/lora-only/run] [--max-blocks 16]
    python bench/routing.py --run runs/smollm2-real --out bench/out/routing-real --name routing-real
    python bench/routing.py --run runs/smollm2-real --out bench/out/routing-real --name routing-real-eval \
        --routers export --max-blocks 32      # the export's router alone, on more blocks

A run that names held-out text (`heldout` in its config, as configs/smollm2-real.yaml does) is
scored on that text instead. Either way each source is its own set (there: another source and
another genre).

Writes bench/results/NAME.json and NAME.md (NAME: routing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import command_line, git_commit, machine
from recovery import HELD_OUT as GENRE  # the held-out text of another genre recovery.py scores on
from transfer import OTHER_SOURCES as OTHER  # Debian's reference manual, Python's standard library
from koff.data import DomainData, parse_domain
from koff.experiments.routing import PROMPT_TOKENS, routing_markdown, routing_report, routing_sets
from koff.export import export_run
from koff.io import markdown_table, write_json, write_text
from koff.formats.run import read_config_values
from koff.routing import HiddenStateRouter
from koff.routing.router import routing_layer
from koff.runtime import load
from koff.scoring import token_nll_sum



def accuracy(picks: dict[str, list[str | None]]) -> dict[str, float]:
    table = {d: sum(p == d for p in ps) / len(ps) for d, ps in picks.items()}
    return table | {"mean": sum(table.values()) / len(table)}


@torch.no_grad()
def router_picks(runtime, router, sets: dict, length: int) -> dict[str, list[str | None]]:
    return {domain: [name for name, _ in router.choose(runtime.model.base, list(blocks[:, :length]),
                                                       runtime.tokenizer.pad_token_id)]
            for domain, blocks in sets.items()}


@torch.no_grad()
def likelihood_picks(runtime, sets: dict, length: int) -> dict[str, list[str]]:
    """Each prompt goes to the memory under which its tokens are most likely."""
    out = {}
    for domain, blocks in sets.items():
        ids = blocks[:, :length]
        scores = torch.stack([torch.stack([token_nll_sum(runtime.model(ids[i:i + 1], m), ids[i:i + 1])
                                           for i in range(len(ids))]) for m in runtime.memories])
        out[domain] = [runtime.memories[j] for j in scores.argmin(0).tolist()]
    return out


def hidden_state_routers(runtime, domains: list[DomainData]) -> dict:
    """The hidden-state router at an eighth, a quarter, a half and the last of the backbone's depth,
    from the ``domains``' training blocks."""
    layers = runtime.model.layout.num_layers
    depths = {"an eighth": max(0, layers // 8), "a quarter": routing_layer(layers), "a half": layers // 2,
              "the last": layers - 1}
    train = {d.name: HiddenStateRouter.training_blocks(d.train) for d in domains}
    pad = runtime.tokenizer.pad_token_id
    return {f"hidden state, {k} (layer {layer})": HiddenStateRouter.build(runtime.model.base, train, pad, layer=layer)
            for k, layer in depths.items()}


def latency(runtime, sets: dict, repeats: int = 5) -> dict:
    """Median ms for the export's router to route one 64-token prompt, and to its first generated
    token with the memory named."""
    prompt = runtime.tokenizer.decode(next(iter(sets.values()))[0][:64])
    memory = runtime.memories[0]
    route, first = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        runtime.route(prompt)
        t1 = time.perf_counter()
        runtime.generate(prompt, memory=memory, max_new_tokens=1)
        t2 = time.perf_counter()
        route.append(t1 - t0)
        first.append(t2 - t1)
    route_ms, first_ms = statistics.median(route[1:]) * 1e3, statistics.median(first[1:]) * 1e3
    return {"route_ms": round(route_ms, 1), "first_token_ms": round(first_ms, 1),
            "share_of_time_to_first_token": round(route_ms / (route_ms + first_ms), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="bench/out/lora-only/run", help="a finished run of the embedded model")
    parser.add_argument("--out", default="bench/out/routing")
    parser.add_argument("--corpora", default="corpora")
    parser.add_argument("--max-blocks", type=int, default=16)
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--name", default="routing", help="results file name")
    parser.add_argument("--routers", choices=["all", "export"], default="all",
                        help="export: only the export's own router (skips the hidden-state and likelihood routers' hour)")
    args = parser.parse_args()
    command, commit = command_line(), git_commit()
    export = Path(args.out) / "export"
    if not (export / "router.safetensors").is_file():
        export_run(args.run, export, force=export.exists())
    runtime = load(export)
    corpora = Path(args.corpora)
    heldout = [t for t in read_config_values(Path(args.run)).get("heldout") or [] if Path(parse_domain(t).source).is_dir()]
    # A run that names no held-out text (the bundled corpus): Debian's and Python's other sources, then
    # the other genre, where corpora/ has them.
    transfer = heldout or [f"{d}={corpora / s}" for other in (OTHER, GENRE) for d, s in other.items()
                           if d in runtime.memories and (corpora / s).is_dir()]
    t0 = time.perf_counter()
    domain_sets = routing_sets(runtime, transfer=transfer, transfer_max_blocks=args.max_blocks)
    table = routing_report(runtime, domain_sets, args.max_blocks)
    sets = {kind: {d.name: d.val[:args.max_blocks].long() for d in domains} for kind, domains in domain_sets.items()}
    routers = {"tokens (the export's)": runtime.router}
    if args.routers == "all":
        routers |= hidden_state_routers(runtime, domain_sets["validation"])
    methods = {}
    for name, router in routers.items():
        methods[name] = {kind: {str(n): accuracy(router_picks(runtime, router, s, n)) for n in PROMPT_TOKENS}
                         for kind, s in sets.items()}
    if args.routers == "all":
        methods["likelihood (one forward per memory)"] = {kind: {str(n): accuracy(likelihood_picks(runtime, s, n))
                                                                  for n in PROMPT_TOKENS} for kind, s in sets.items()}
    result = {"command": command, "commit": commit, "machine": machine(), "run": args.run, "export": str(export),
              "max_blocks": args.max_blocks, "routing": table, "methods": methods, "latency": latency(runtime, sets["validation"]),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json(Path(args.results) / f"{args.name}.json", result)
    text = report(result)
    write_text(Path(args.results) / f"{args.name}.md", text)
    print(text)


def report(r: dict) -> str:
    kinds = list(next(iter(r["methods"].values())))
    rows = [[method, *[by_kind[k][str(n)]["mean"] for k in kinds for n in PROMPT_TOKENS]] for method, by_kind in r["methods"].items()]
    lat = r["latency"]
    lines = [
        "# Routing: model: auto", "", f"Command: `{r['command']}`  ", f"Commit: {r['commit']}  ", f"Machine: {r['machine']}", "",
        f"Export of `{r['run']}`; up to {r['max_blocks']} blocks per domain and source. Mean accuracy over the domains "
        "(the prompt is a block's first 16, 64 or 256 tokens):", "",
        markdown_table(["router", *[f"{k}, {n} tok" for k in kinds for n in PROMPT_TOKENS]], rows), "",
        f"Routing one 64-token prompt: {lat['route_ms']} ms; its first token with the memory named: "
        f"{lat['first_token_ms']} ms; routing is {lat['share_of_time_to_first_token']:.1%} of the time to first token.", "",
        "## The export's router in detail (`koff eval EXPORT --routing`)", "", routing_markdown(r["routing"]), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

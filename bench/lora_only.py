"""What a memory keeps where only its LoRA can run (llama.cpp, or any engine without koff's KV
prefix): held-out perplexity of an export with each memory whole (LoRA + KV prefix), with its LoRA
alone and with its KV prefix alone, beside the bare backbone and the dense base it came from; and
with a LoRA-only memory trained on its own on the same mask (``--memory lora --mask file:...``, the
same budget), which is what a user who serves in llama.cpp would train.

llama.cpp runs the backbone and a memory's LoRA with koff's own logits (``tests/test_gguf_export.py``),
so the LoRA-alone column is what that memory gives there.

    python bench/lora_only.py                          # a 12% run of the embedded model, 5 domains
    python bench/lora_only.py --run RUN --export OUT   # an existing run and its export
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from common import command_line, git_commit, machine
from koff.config import DecomposeConfig
from koff.io import markdown_table, write_json, write_text
from koff.memories.memory import DomainMemory
from koff.memories.parts import KV_PREFIX, LORA

COLUMNS = ("backbone", "lora+kv", "lora", "kv", "lora_trained")
DOMAINS = {"eng": "bundled:eng", "deu": "bundled:deu", "fra": "bundled:fra", "spa": "bundled:spa",
           "python": "bundled:code/python"}


def part(memory: DomainMemory, keep: str) -> DomainMemory:
    """A copy of ``memory`` with only its LoRA (``keep="lora"``) or only its KV prefix (``"kv"``)."""
    return memory.keeping([LORA] if keep == "lora" else [KV_PREFIX], f"{memory.name}-{keep}")


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, memory: str | None, batch: int = 4) -> float:
    from koff.scoring import token_nll_sum

    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start:start + batch]
        total += float(token_nll_sum(model(ids, memory), ids))
        count += ids.numel() - ids.shape[0]
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="bench/out/lora-only/run")
    parser.add_argument("--export", default="bench/out/lora-only/export")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--max-blocks", type=int, default=20, help="validation blocks scored per domain")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="lora-only")
    args = parser.parse_args()
    from koff.data import load_domains, parse_domains
    from parallel_runs import finished
    from koff.export import export_run
    from koff.models.loader import load_model
    from koff.model import KoffModel
    from koff.memories.memory import MemoryConfig
    from koff.runtime import load
    from koff.training import Decomposer

    config = DecomposeConfig(model="smollm2-135m", domain=[f"{k}={v}" for k, v in DOMAINS.items()], out=args.run,
                             steps=args.steps, batch_size=args.batch_size, sparsity=0.12, eval=False)
    lora_config = replace(config, out=args.run + "-lora", memory="lora", mask=f"file:{args.run}/mask.safetensors")
    for run, export in ((config, args.export), (lora_config, args.export + "-lora")):
        if not finished(run):
            Decomposer(run).train()
        if not (Path(export) / "backbone").is_dir():
            export_run(run.out, export)
    runtime = load(args.export)
    domains = load_domains(parse_domains(config.domain), runtime.tokenizer, block_len=config.block_len,
                           val_fraction=config.val_fraction, seed=config.seed)  # the run's own split
    blocks = {d.name: d.val[: args.max_blocks].long() for d in domains}
    model = runtime.model
    for name in list(model.memories):
        for keep in ("lora", "kv"):
            model.add_memory(part(model.memories[name], keep))
        # the same mask makes the same backbone (fingerprint), so the LoRA-only run's memories load here
        runtime.add_memory(Path(args.export + "-lora") / "memories" / name, name=f"{name}-lora-trained")
    dense = KoffModel(load_model("smollm2-135m").model, MemoryConfig(kind="none"))
    rows, results = [], {}
    for name, ids in blocks.items():
        base = perplexity(dense, ids, None)
        cells = {"dense": base, "backbone": perplexity(model, ids, None), "lora+kv": perplexity(model, ids, name),
                 "lora": perplexity(model, ids, f"{name}-lora"), "kv": perplexity(model, ids, f"{name}-kv"),
                 "lora_trained": perplexity(model, ids, f"{name}-lora-trained")}
        results[name] = cells
        rows.append([name, f"{base:.2f}"] + [f"{cells[k] / base:.3f}" for k in COLUMNS])
        print(name, cells, flush=True)
    mean = {k: math.exp(sum(math.log(r[k] / r["dense"]) for r in results.values()) / len(results))
            for k in COLUMNS}
    rows.append(["geometric mean", ""] + [f"{mean[k]:.3f}" for k in COLUMNS])
    report = {"command": command_line(), "machine": machine("cpu"), "commit": git_commit(), "steps": args.steps,
              "batch_size": args.batch_size, "max_blocks": args.max_blocks, "perplexity": results, "mean_ratio": mean}
    write_json(Path(args.out) / f"{args.name}.json", report)
    text = (f"# {args.name}\n\n`{report['command']}`\n\n{report['machine']}, commit {report['commit']}\n\n"
            f"A 12% KOFF run of the embedded model ({args.steps} steps of {args.batch_size} x 256 tokens, bundled corpus), "
            f"exported; perplexity on {args.max_blocks} validation blocks per domain, as a ratio to the dense base. "
            "The LoRA-only memory trained on the same mask for the same steps; the two LoRA columns are what "
            "llama.cpp can run.\n\n"
            + markdown_table(["domain", "dense perplexity", "backbone alone", "LoRA + KV", "its LoRA alone", "its KV alone",
                              "a LoRA-only memory"], rows) + "\n")
    write_text(Path(args.out) / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()

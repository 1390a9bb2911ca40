"""Benchmark for `koff decompose` on the embedded SmolLM2-135M (issue 3).

Measures, at the target sparsity, held-out perplexity per domain for the dense base, KOFF (final
binary mask + each domain's memory) and the same mask without memories; training tokens/s and wall
time; and the cost of one KOFF step relative to a plain LoRA fine-tuning step of the same model
(PEFT's LoRA, and koff's own loop with --mask none --memory lora), same batch.

    python bench/decompose.py                     # full run, ~1 h on the 2-core CPU
    python bench/decompose.py --steps 4 --quick   # smoke test

Writes bench/results/decompose.json and decompose.md (with the command that produced them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import add_run_options, command_line, git_commit, machine, named_config, with_settings
from koff.cli.common import markdown_table
from koff.data import load_domains, parse_domains
from koff.evaluation.decomposition import SUMMARY_KEYS, DecompositionEval
from koff.training.pipeline import decompose
from koff.io import write_json, write_text
from koff.models import load_model
from koff.training import DecomposeConfig, Decomposer

BUNDLED_RUN = named_config("smollm2")  # the run on the bundled corpus (the README first ran this one)
DOMAINS = BUNDLED_RUN["domain"]


def median_step_seconds(step, steps: int, device: torch.device) -> float:
    """Median wall time of ``step()`` over ``steps`` calls, the first (warm-up) left out; on a GPU
    each call waits for the device, so that host clocks time what it did."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def peft_lora_step_seconds(model_spec: str, batch: torch.Tensor, steps: int, rank: int, targets: list[str]) -> float:
    """Median seconds of one forward+backward+AdamW step of PEFT LoRA on the same model and batch."""
    from peft import LoraConfig, get_peft_model

    base = load_model(model_spec, device=str(batch.device)).model
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return median_step_seconds(step, steps, batch.device)


def koff_step_seconds(config: DecomposeConfig, base, tokenizer, domains, steps: int) -> float:
    dec = Decomposer(config, base=base, tokenizer=tokenizer, domains=domains)
    return median_step_seconds(dec.train_step, steps, dec.accelerator.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUNDLED_RUN["model"])
    parser.add_argument("--steps", type=int, default=BUNDLED_RUN["steps"])
    parser.add_argument("--sparsity", type=float, default=BUNDLED_RUN["sparsity"])
    parser.add_argument("--batch-size", type=int, default=BUNDLED_RUN["batch_size"])
    parser.add_argument("--eval-max-blocks", type=int, default=BUNDLED_RUN["eval_max_blocks"])
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--out", default="bench/out/decompose")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--constraint", default="projected", choices=["projected", "lagrangian"])
    parser.add_argument("--final-fraction", type=float, default=0.4)
    parser.add_argument("--target-warmup", type=float, default=0.25)
    parser.add_argument("--init-shape", default="mask", choices=["ranked", "mask"])
    parser.add_argument("--distill-weight", type=float, default=1.0, help="weight of KL(dense || student) in the loss")
    add_run_options(parser)
    parser.add_argument("--tag", default="", help="suffix for the result files (decompose<tag>.json)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="few eval blocks, for a smoke test")
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()  # the code this run uses: taken before it starts

    config = DecomposeConfig(
        model=args.model, domain=DOMAINS, out=args.out, sparsity=args.sparsity, steps=args.steps,
        batch_size=args.batch_size, eval_max_blocks=2 if args.quick else args.eval_max_blocks,
        checkpoint_every=20, constraint=args.constraint, final_fraction=args.final_fraction,
        target_warmup=args.target_warmup, init_shape=args.init_shape, distill_weight=args.distill_weight,
        lr_mask=args.lr_mask, device=args.device, distill_every=args.distill_every,
    )
    config = with_settings(config, args.set)
    loaded = load_model(args.model, device=args.device)
    domains = load_domains(parse_domains(DOMAINS), loaded.tokenizer, block_len=config.block_len,
                           val_fraction=config.val_fraction, seed=config.seed)
    wall = time.perf_counter()
    _, summary = decompose(config, resume=args.resume, base=loaded.model, tokenizer=loaded.tokenizer, domains=domains)
    wall = time.perf_counter() - wall

    # Step cost: the KOFF step from the run's own log, plain LoRA steps measured here on the same batch shape.
    records = [json.loads(line) for line in (Path(args.out) / "log.jsonl").read_text().splitlines()]
    # The mean, not the median: with --distill-every k the steps alternate between two costs.
    koff_step = statistics.mean(r["seconds"] for r in records[1:] or records)
    batch = torch.stack([d.train[0] for d in domains][: args.batch_size]).to(args.device, torch.long)
    targets = list(config.lora_targets)
    peft_step = peft_lora_step_seconds(args.model, batch, args.timing_steps, config.lora_rank, targets)
    lora_config = DecomposeConfig(**{**config.to_dict(), "mask": "none", "memory": "lora", "out": args.out + "-lora"})
    fresh = load_model(args.model, device=args.device)
    koff_lora_step = koff_step_seconds(lora_config, fresh.model, fresh.tokenizer, domains, args.timing_steps)

    typed = DecompositionEval.from_dict(summary["eval"])
    ev = typed.to_dict()  # the JSON keys ("dense", "mask+memories", "mask only") of the results files
    dense = typed.dense["domains"]
    names = list(dense)
    ratio = {k: {d: ev[k]["domains"][d]["perplexity"] / dense[d]["perplexity"] for d in names} for k in ev}
    mean_ratio = {k: sum(r.values()) / len(r) for k, r in ratio.items()}
    koff, bare = SUMMARY_KEYS["with_memories"], SUMMARY_KEYS["mask_only"]
    goals = {
        "koff_within_5pct_every_domain": all(ratio[koff][d] <= 1.05 for d in names),
        "koff_within_3pct_on_average": mean_ratio[koff] <= 1.03,
        "mask_only_at_least_25pct_worse_on_average": mean_ratio[bare] >= 1.25,
        "koff_step_at_most_1.5x_peft_lora_step": koff_step / peft_step <= 1.5,
    }
    result = {
        "command": command,
        "commit": commit,
        "machine": machine(args.device),
        "config": config.to_dict(),
        "sparsity": summary["sparsity"],
        "whole_model_sparsity": summary["whole_model_sparsity"],
        "perplexity": {k: {d: v["domains"][d]["perplexity"] for d in names} for k, v in ev.items()},
        "ratio_to_dense": ratio,
        "mean_ratio_to_dense": mean_ratio,
        "train_tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_seconds_this_process"],
        "wall_seconds_total": round(wall, 1),
        "step_seconds": {"koff": koff_step, "peft_lora": peft_step, "koff_loop_lora_only": koff_lora_step},
        "koff_step_over_peft_lora_step": koff_step / peft_step,
        "koff_step_over_koff_lora_step": koff_step / koff_lora_step,
        "memory_parameters_per_domain": summary["memory_parameters"],
        "goals_met": goals,
    }
    results = Path(args.results)
    write_json(results / f"decompose{args.tag}.json", result)
    rows = [[k, *[f"{ev[k]['domains'][d]['perplexity']:.2f} ({ratio[k][d]:.3f})" for d in names], f"{mean_ratio[k]:.3f}"] for k in ev]
    table = markdown_table(["configuration", *names, "mean ratio"], rows)
    text = "\n".join([
        f"# koff decompose benchmark ({args.model}, sparsity {summary['sparsity']:.4f} of block parameters, "
        f"{summary['whole_model_sparsity']:.4f} of the whole model)", "",
        f"Command: `{command}`  ", f"Commit: {commit}", "", f"Machine: {result['machine']}", "",
        "Held-out perplexity (ratio to dense):", "", table, "",
        f"Training: {config.steps} steps x {config.batch_size} x {config.block_len} tokens, "
        f"{summary['tokens_per_s']} tokens/s, {summary['train_seconds_this_process']} s training, {wall:.0f} s wall in all.", "",
        f"Step cost: KOFF {koff_step:.2f} s, PEFT LoRA {peft_step:.2f} s (ratio {koff_step / peft_step:.2f}), "
        f"koff loop with LoRA only {koff_lora_step:.2f} s (ratio {koff_step / koff_lora_step:.2f}).", "",
        "Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()), "",
    ])
    write_text(results / f"decompose{args.tag}.md", text)
    print(text)


if __name__ == "__main__":
    main()

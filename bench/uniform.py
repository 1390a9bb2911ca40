"""Per-layer vs uniform layer shapes on the embedded SmolLM2-135M (issue 16).

Quality: two `bench/decompose.py` results at the same budget, one per layer shape (their JSON files),
side by side with their parameter counts. Speed: the uniform run exported with `--uniform` and
loaded in plain `transformers` (no koff code), against the dense base, also plain: forward tokens/s
and greedy `generate` tokens/s, beside the ideal speed-up from the FLOPs they remove.

    python bench/uniform.py [--per-layer bench/results/decompose-distill-every2.json]
                            [--uniform bench/results/decompose-uniform.json] [--run bench/out/decompose-uniform]

Writes bench/results/uniform.json and uniform.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from common import add_speed_options, command_line, git_commit, machine
from export import linear_flops_per_token, timed
from koff.export import export_run
from koff.formats.run import read_config
from koff.io import markdown_table, write_json, write_text
from koff.models import load_model


def plain_speed(model, batch: int, length: int, new: int, repeats: int) -> dict:
    """Forward and greedy-generation tokens/s of a plain transformers model (random token ids)."""
    ids = torch.randint(0, 1000, (batch, length))
    prompt = torch.randint(0, 1000, (batch, 64))
    with torch.no_grad():
        forward = batch * length / timed(lambda: model(ids), repeats)
        generate = batch * new / timed(lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                              pad_token_id=0), repeats)
    return {"forward_tokens_per_s": forward, "generate_tokens_per_s": generate}


def quality(result: dict) -> dict:
    return {"ratio_to_dense": result["ratio_to_dense"], "mean_ratio_to_dense": result["mean_ratio_to_dense"],
            "sparsity": result["sparsity"], "whole_model_sparsity": result["whole_model_sparsity"],
            "command": result["command"], "commit": result.get("commit")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-layer", default="bench/results/decompose-distill-every2.json")
    parser.add_argument("--uniform", default="bench/results/decompose-uniform.json")
    parser.add_argument("--run", default="bench/out/decompose-uniform", help="the uniform run's folder")
    add_speed_options(parser)
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()
    per_layer, uniform = (json.loads(Path(p).read_text()) for p in (args.per_layer, args.uniform))

    dense = load_model(read_config(Path(args.run)).model).model
    with tempfile.TemporaryDirectory() as tmp:
        summary = export_run(args.run, Path(tmp) / "export", uniform=True)
        plain = AutoModelForCausalLM.from_pretrained(Path(tmp) / "export" / "backbone", dtype=torch.float32).eval()
    widths = {"intermediate_size": plain.config.intermediate_size, "num_key_value_heads": plain.config.num_key_value_heads,
              "num_attention_heads": plain.config.num_attention_heads}
    context = args.length // 2
    ideal = linear_flops_per_token(dense, context) / linear_flops_per_token(plain, context)
    speeds = {"dense": plain_speed(dense, args.batch, args.length, args.new_tokens, args.repeats),
              "uniform_export": plain_speed(plain, args.batch, args.length, args.new_tokens, args.repeats)}
    speedup = {k: speeds["uniform_export"][k] / speeds["dense"][k] for k in speeds["dense"]}
    result = {
        "command": command, "commit": commit, "machine": machine(),
        "quality": {"per-layer": quality(per_layer), "uniform": quality(uniform)},
        "parameters": {"dense": summary["dense_parameters"], "uniform_export": summary["parameters"]},
        "uniform_config": widths, "speed": speeds, "speedup": speedup, "ideal_speedup_from_flops": ideal,
    }
    write_json(Path(args.results) / "uniform.json", result)
    domains = list(per_layer["ratio_to_dense"]["mask+memories"])
    rows = []
    for shape, r in (("per-layer", per_layer), ("uniform", uniform)):
        koff, bare = r["ratio_to_dense"]["mask+memories"], r["ratio_to_dense"]["mask only"]
        rows.append([f"{shape}: KOFF", *(koff[d] for d in domains), r["mean_ratio_to_dense"]["mask+memories"]])
        rows.append([f"{shape}: mask alone", *(bare[d] for d in domains), r["mean_ratio_to_dense"]["mask only"]])
    text = "\n".join([
        "# Per-layer vs uniform layer shapes (SmolLM2-135M, 12%)", "", f"Command: `{command}`  ", f"Commit: {commit}  ",
        f"Machine: {result['machine']}", "", f"Per-layer: `{per_layer['command']}`  ", f"Uniform: `{uniform['command']}`", "",
        "Held-out perplexity / dense:", "", markdown_table(["configuration", *domains, "mean"], rows), "",
        f"Uniform export: {summary['parameters']:,} parameters of the dense {summary['dense_parameters']:,} "
        f"({summary['parameters'] / summary['dense_parameters']:.3f}); stock config {widths}.", "",
        f"Plain transformers, {args.batch} x {args.length} tokens forward, greedy generate of {args.new_tokens} tokens: "
        f"forward {speedup['forward_tokens_per_s']:.3f}x and generation {speedup['generate_tokens_per_s']:.3f}x the dense "
        f"model's speed; the removed FLOPs allow {ideal:.3f}x.", "",
    ])
    write_text(Path(args.results) / "uniform.md", text)
    print(text)


if __name__ == "__main__":
    main()

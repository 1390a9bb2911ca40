"""Decoding speed of an exported backbone with its memories against the dense model it came from.

A 12% export is made through ``koff decompose``'s own path (2 training steps: speed does not
depend on how well the memories learned), then every way below generates the same prompts with
no early stop (``max_new_tokens`` forced), timed as the median of ``--repeats`` after a warm-up:

* ``hf_dense``: ``transformers``' ``generate`` on the dense base (greedy);
* ``koff_dense``: koff's decoding step (``DecodeBatch``) on the dense base, no memory;
* ``koff_backbone``: koff's step on the exported backbone, no memory;
* ``koff_memory``: the same with a memory (LoRA + KV prefix); at batch 16, ``koff_one_memory``
  gives every row the same memory and ``koff_mixed`` spreads 4 memories over the rows;
* ``..._merged``: the same with ``--merge-lora`` (a batch on one memory runs on weights with its
  LoRA merged in);
* ``..._compiled``: the same with ``--compile`` (the step's forward through ``torch.compile``, CUDA
  graphs on a GPU; compiling happens in the warm-up call).

Per generated token it also counts, at batch 1, the PyTorch operations dispatched (each a kernel
launch or more on a GPU) and the reads back to the host (each a wait for the GPU). On a GPU the
weights read per token over the time per token is set beside the device's memory bandwidth.

    python bench/decode.py                                 # CPU: the embedded SmolLM2-135M, fp32
    python bench/decode.py --shapes llama-3.2-1b llama-3.1-8b --device cuda   # random weights, bf16
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import command_line, git_commit, machine, top_level_aten_ops
from koff.config import DecomposeConfig
from koff.io import markdown_table, write_json, write_text
from koff.memories.memory import MemoryConfig
from koff.model import KoffModel
from koff.models import resolve_dtype
from koff.runtime import DecodeBatch, Sampling, generation
from random_base import random_domains, random_model, reset_peak, synchronize, word_tokenizer
from koff.training import Decomposer

PROMPT_TOKENS = 32  # bench/scale.py's greedy check
EMBEDDED = "smollm2-135m"
MIXED = 4  # memories spread over the rows of the mixed batch
# Memory bandwidth of the devices koff is lent, GB/s (SXM parts): the limit of batch-1 decoding.
BANDWIDTH = {"H100": 3350, "H200": 4800}
# Operations that read a value back to the host.
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::equal",
              "aten::is_nonzero", "aten::item"}


# ----- the models ---------------------------------------------------------------------------------
def export_model(model: str, settings: DecomposeConfig, work: Path) -> tuple[str, list[torch.Tensor], float, dict]:
    """A 2-step run of ``model`` (the embedded one, or ``shape:NAME`` with random weights) and its
    export under ``work``; returns (the dense base's folder or name, validation blocks per domain,
    export seconds, the export's summary)."""
    from koff.export import export_run

    if model.startswith("shape:"):
        dtype = resolve_dtype(settings.dtype, settings.device)
        base, config = random_model(model[len("shape:"):], dtype, settings.device)
        base.save_pretrained(work / "base")
        word_tokenizer(config.vocab_size, config.eos_token_id).save_pretrained(work / "base")
        del base
        domains = random_domains(config.vocab_size, settings.block_len)
        run = replace(settings, model=str(work / "base"), domain=[])
    else:
        domains = None
        run = replace(settings, model=model, domain=[f"{name}=bundled:{name}" for name in ("eng", "deu", "fra", "spa")])
    run = replace(run, out=str(work / "run"), steps=2, checkpoint_every=2)
    trainer = Decomposer(run, domains=domains)
    trainer.train()
    blocks = [d.val.long() for d in trainer.domains]
    base_folder = run.model if domains is None else str(work / "base")
    del trainer
    reset_peak(settings.device)
    start = time.perf_counter()
    summary = export_run(work / "run", work / "export")
    return base_folder, blocks, time.perf_counter() - start, summary


def dense_base(spec: str, device: str, dtype: str):
    from koff.models.loader import load_model

    return load_model(spec, dtype, device).model


# ----- the ways to generate ---------------------------------------------------------------------
OPEN_LLAMAS: list = []  # llama.cpp models, closed before the interpreter exits (their finalisers fail then)

def koff_generate(model: KoffModel, prompts: torch.Tensor, memories: list[str | None], new_tokens: int,
                  compile: bool = False) -> list:
    """koff's continuous-batching step over ``prompts`` (rows of ids), ``new_tokens`` each."""
    batch = DecodeBatch(model, pad_id=0, eos_ids=set(), compile=compile)
    for ids, memory in zip(prompts.tolist(), memories):
        batch.add(ids, memory, Sampling(new_tokens))
    tokens = []
    while len(batch):
        tokens += batch.step()
    return tokens


def hf_generate(model, prompts: torch.Tensor, new_tokens: int):
    ids = prompts.to(model.device)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def tokens_per_s(generate, rows: int, new_tokens: int, device: str, repeats: int) -> float:
    """Generated tokens per second: the median of ``repeats`` timed calls after a warm-up call."""
    return interleaved_tokens_per_s({"way": (rows, generate)}, new_tokens, device, repeats)["way"]


def interleaved_tokens_per_s(ways: dict, new_tokens: int, device: str, repeats: int) -> dict[str, float]:
    """{name: generated tokens per second} of ``ways`` ({name: (rows, generate(n))}): one warm-up
    call each, then ``repeats`` rounds that time each way once, in turn, so that a machine that
    slows down or speeds up in the meantime weighs on every way alike; the median counts."""
    for _, generate in ways.values():
        generate(new_tokens)
    times = {name: [] for name in ways}
    for _ in range(repeats):
        for name, (_, generate) in ways.items():
            synchronize(device)
            start = time.perf_counter()
            generate(new_tokens)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: rows * new_tokens / statistics.median(times[name]) for name, (rows, _) in ways.items()}


def per_token_counts(generate, short: int = 4, long: int = 12) -> tuple[float, float]:
    """(operations dispatched, reads back to the host) per generated token: the difference of two
    generations, so that the prefill cancels out. koff's one read per step is a ``tolist`` (no
    dispatched operation on a CPU), counted where it is made (``host_values``)."""
    from torch.profiler import ProfilerActivity, profile

    counts, read = [], generation.host_values
    for n in (long, short):
        calls = []
        generation.host_values = lambda t: calls.append(1) or read(t)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                generate(n)
        finally:
            generation.host_values = read
        counts.append((top_level_aten_ops(prof), len(calls) + sum(1 for e in prof.events() if e.name in HOST_READS)))
    (ops_long, reads_long), (ops_short, reads_short) = counts
    return (ops_long - ops_short) / (long - short), (reads_long - reads_short) / (long - short)


def merged(model: KoffModel, generate):
    """``generate`` run with ``--merge-lora``'s setting switched on for the call."""
    def run(n):
        model.batch_memories.merge_single = True
        try:
            return generate(n)
        finally:
            model.batch_memories.merge_single = False
    return run


def ways(dense, backbone: KoffModel, dense_koff: KoffModel, prompts: torch.Tensor, names: list[str],
         compiled: bool) -> dict:
    """name -> (rows, generate(n)) for batch 1 and batch ``len(prompts)``; with ``compiled``, the
    ways of ``--compile`` too."""
    one, rows = prompts[:1], len(prompts)
    mixed = [names[i % min(MIXED, len(names))] for i in range(rows)]
    table = {
        "batch 1": {
            "hf_dense": (1, lambda n: hf_generate(dense, one, n)),
            "koff_dense": (1, lambda n: koff_generate(dense_koff, one, [None], n)),
            "koff_backbone": (1, lambda n: koff_generate(backbone, one, [None], n)),
            "koff_memory": (1, lambda n: koff_generate(backbone, one, [names[0]], n)),
            "koff_memory_merged": (1, merged(backbone, lambda n: koff_generate(backbone, one, [names[0]], n))),
        },
        f"batch {rows}": {
            "hf_dense": (rows, lambda n: hf_generate(dense, prompts, n)),
            "koff_backbone": (rows, lambda n: koff_generate(backbone, prompts, [None] * rows, n)),
            "koff_one_memory": (rows, lambda n: koff_generate(backbone, prompts, [names[0]] * rows, n)),
            "koff_one_memory_merged": (rows, merged(backbone, lambda n: koff_generate(backbone, prompts, [names[0]] * rows, n))),
            "koff_mixed": (rows, lambda n: koff_generate(backbone, prompts, mixed, n)),
        },
    }
    if compiled:
        table["batch 1"] |= {
            "koff_backbone_compiled": (1, lambda n: koff_generate(backbone, one, [None], n, compile=True)),
            "koff_memory_compiled": (1, lambda n: koff_generate(backbone, one, [names[0]], n, compile=True))}
        table[f"batch {rows}"] |= {
            "koff_one_memory_compiled": (rows, lambda n: koff_generate(backbone, prompts, [names[0]] * rows, n, compile=True)),
            "koff_mixed_compiled": (rows, lambda n: koff_generate(backbone, prompts, mixed, n, compile=True))}
    return table


def batch_one_speeds(work: Path, base_spec: str, prompt: torch.Tensor, device: str, dtype: str, new_tokens: int) -> dict:
    """Tokens/s at batch 1 of ``export_model``'s export (with the memory of the first domain and
    without) and of the dense base, one timed call each after a warm-up (``bench/scale.py``'s check)."""
    from koff.runtime import load

    runtime = load(work / "export", device=device, dtype=dtype)
    memory = sorted(runtime.memories)[0]
    speeds = {"koff_memory": tokens_per_s(lambda n: koff_generate(runtime.model, prompt, [memory], n), 1, new_tokens, device, 1),
              "koff_backbone": tokens_per_s(lambda n: koff_generate(runtime.model, prompt, [None], n), 1, new_tokens, device, 1),
              "hf_backbone": tokens_per_s(lambda n: hf_generate(runtime.model.base, prompt, n), 1, new_tokens, device, 1)}
    del runtime
    reset_peak(device)
    dense = dense_base(base_spec, device, dtype)
    speeds["hf_dense"] = tokens_per_s(lambda n: hf_generate(dense, prompt, n), 1, new_tokens, device, 1)
    return speeds


def llama_cpp_ways(runtime, dense, work: Path, prompt: torch.Tensor, memory: str, dtype: str) -> dict:
    """llama.cpp at batch 1 on GGUF files that ``koff export --format gguf`` writes: the dense base,
    the backbone, and the backbone with ``memory``'s LoRA (llama.cpp has no KV prefix)."""
    import llama_cpp

    from koff.export.gguf import write_gguf, write_model_gguf

    written = write_gguf(work / "export", work / "gguf", dtype)
    dense_path = work / "gguf" / f"dense-{dtype}.gguf"
    write_model_gguf(dense, runtime.tokenizer, runtime.meta.get("base_model"), dense_path, dtype)
    threads = torch.get_num_threads()
    ids = prompt[0].tolist()

    def generate(path, lora=None):
        model = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + 512, n_threads=threads, n_threads_batch=threads,
                                lora_path=str(lora) if lora else None, verbose=False)
        OPEN_LLAMAS.append(model)

        def run(n):
            model.reset()
            model.eval(ids)
            for _ in range(n):  # greedy, no early stop
                model.eval([int(model.scores[model.n_tokens - 1].argmax())])
        return run

    return {"llama_cpp_dense": (1, generate(dense_path)), "llama_cpp_backbone": (1, generate(written["backbone"])),
            "llama_cpp_lora": (1, generate(written["backbone"], written[memory]))}


def same_greedy_tokens(dense, dense_koff: KoffModel, prompt: torch.Tensor, new_tokens: int) -> bool:
    """koff's step and transformers' generate pick the same greedy tokens on the dense base."""
    hf = hf_generate(dense, prompt, new_tokens)[0, prompt.shape[1]:].tolist()
    return hf == [t for _, t in koff_generate(dense_koff, prompt, [None], new_tokens)]


# ----- one model --------------------------------------------------------------------------------
def weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads (the input embedding reads one row: left out)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - (embedding.numel() * embedding.element_size() if head is not embedding else 0)


def measure(model: str, args) -> dict:
    device = args.device
    settings = DecomposeConfig(model=model, out="unused", device=device, dtype=args.dtype, batch_size=2, block_len=128,
                               calib_blocks=8, eval=False, sparsity=args.sparsity)
    work = Path(tempfile.mkdtemp(prefix="koff-decode-"))
    try:
        base_folder, blocks, _, _ = export_model(model, settings, work)
        prompts = torch.cat([b[:, : args.prompt_tokens] for b in blocks])[: args.batch]
        if len(prompts) < args.batch:
            raise SystemExit(f"only {len(prompts)} prompt blocks of {args.prompt_tokens} tokens; lower --batch")
        from koff.runtime import load

        runtime = load(work / "export", device=device, dtype=args.dtype)
        dense = dense_base(base_folder, device, args.dtype)
        dense_koff = KoffModel(dense, MemoryConfig(kind="none"))
        names = sorted(runtime.memories)
        table = ways(dense, runtime.model, dense_koff, prompts, names, args.compile)
        speeds = {size: interleaved_tokens_per_s(entries, args.new_tokens, device, args.repeats)
                  for size, entries in table.items()}
        if args.llama_cpp:  # fast and so noisier on a shared CPU: more rounds
            speeds["batch 1"] |= interleaved_tokens_per_s(
                llama_cpp_ways(runtime, dense, work, prompts[:1], names[0], args.gguf_dtype), args.new_tokens, device,
                args.llama_cpp_repeats)
        counts = {name: per_token_counts(fn) for name, (_, fn) in table["batch 1"].items()}
        result = {"model": model, "parameters": runtime.meta.get("parameters"),
                  "dense_parameters": runtime.meta.get("dense_parameters"), "sparsity": runtime.info()["sparsity"],
                  "layer_widths": runtime.meta["layer_widths"], "tokens_per_s": speeds,
                  "ops_per_token": {k: c[0] for k, c in counts.items()},
                  "host_reads_per_token": {k: c[1] for k, c in counts.items()},
                  "greedy_tokens_equal_hf": same_greedy_tokens(dense, dense_koff, prompts[:1], 32),
                  "weight_bytes": {"dense": weight_bytes(dense), "backbone": weight_bytes(runtime.model.base)}}
        print(f"{model}: {result}", flush=True)
        return result
    finally:
        while OPEN_LLAMAS:
            OPEN_LLAMAS.pop().close()
        shutil.rmtree(work, ignore_errors=True)


# ----- report -----------------------------------------------------------------------------------
def bandwidth(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((gbs * 1e9 for key, gbs in BANDWIDTH.items() if key in name), None)


def goal_rows(r: dict) -> list[list[str]]:
    """The issue's CPU goals, where this run measured what they need."""
    one, rows = r["tokens_per_s"]["batch 1"], next(v for k, v in r["tokens_per_s"].items() if k != "batch 1")
    ideal = r["dense_parameters"] / r["parameters"]
    goals = [("koff backbone + memory / hf_dense, batch 1", one["koff_memory"] / one["hf_dense"], 1.05),
             ("4 memories mixed / one memory, batched", rows["koff_mixed"] / rows["koff_one_memory"], 0.9)]
    if "koff_memory_merged" in one:
        goals.insert(1, ("the same, --merge-lora", one["koff_memory_merged"] / one["hf_dense"], 1.05))
        goals.append(("4 memories mixed / one memory merged, batched", rows["koff_mixed"] / rows["koff_one_memory_merged"], 0.9))
    if "koff_memory_compiled" in one:
        goals.insert(2, ("the same, --compile", one["koff_memory_compiled"] / one["hf_dense"], 1.05))
        goals.append(("4 memories mixed / one memory, both --compile", rows["koff_mixed_compiled"] / rows["koff_one_memory_compiled"], 0.9))
    if "llama_cpp_dense" in one:
        goals.append((f"llama.cpp backbone / dense (ideal {ideal:.3f})", one["llama_cpp_backbone"] / one["llama_cpp_dense"],
                      1 + 0.7 * (ideal - 1)))
    return [[f"{name} >= {bound:.3f}", f"{value:.3f}", "yes" if value >= bound else "no"] for name, value, bound in goals]


def report(results: list[dict], device: str) -> str:
    lines = []
    for r in results:
        lines.append(f"## {r['model']}\n\n{r['parameters']:,} parameters in the backbone against {r['dense_parameters']:,} "
                     f"dense (ratio {r['dense_parameters'] / r['parameters']:.3f}); block sparsity {r['sparsity']:.3f}; "
                     f"koff's greedy tokens equal transformers' on the dense base: {r['greedy_tokens_equal_hf']}.\n")
        for size, speeds in r["tokens_per_s"].items():
            dense = speeds["hf_dense"]
            rows = [[name, f"{v:.1f}", f"{v / dense:.2f}x"] for name, v in speeds.items()]
            lines.append(f"{size}, tokens/s (and against `hf_dense`):\n\n" + markdown_table(["way", "tokens/s", "vs hf_dense"], rows))
        lines.append("Goals:\n\n" + markdown_table(["goal", "measured", "met"], goal_rows(r)))
        lines.append("Per generated token at batch 1: operations dispatched / reads back to the host:\n\n" + markdown_table(
            ["way", "operations", "host reads"],
            [[k, f"{r['ops_per_token'][k]:.0f}", f"{r['host_reads_per_token'][k]:.1f}"] for k in r["ops_per_token"]]))
        limit = bandwidth(device)
        if limit:
            speeds = r["tokens_per_s"]["batch 1"]
            rows = [[name, f"{r['weight_bytes'][kind] * speeds[name] / limit:.2f}"]
                    for name, kind in (("hf_dense", "dense"), ("koff_backbone", "backbone"), ("koff_memory", "backbone"),
                                       ("koff_memory_merged", "backbone"), ("koff_backbone_compiled", "backbone"),
                                       ("koff_memory_compiled", "backbone")) if name in speeds]
            lines.append(f"Weights read per second over the bandwidth ({limit / 1e9:.0f} GB/s), batch 1:\n\n"
                         + markdown_table(["way", "share of the limit"], rows))
    return "\n\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help="the embedded model, a local folder, or a GGUF file")
    parser.add_argument("--shapes", nargs="*", default=[], help="random-weight shapes instead of --model "
                        "(e.g. llama-3.2-1b llama-3.1-8b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sparsity", type=float, default=0.12)
    parser.add_argument("--batch", type=int, default=16, help="rows of the batched measurement")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128, help="generated per row, no early stop")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (the median counts), after a warm-up")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
                        help="also llama.cpp at batch 1 on the GGUF files (needs llama-cpp-python)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time koff's --compile ways (each batch size is compiled once, in its warm-up)")
    parser.add_argument("--gguf-dtype", default="f16", help="the GGUF files' matrices (f16, f32, q8_0)")
    parser.add_argument("--llama-cpp-repeats", type=int, default=15, help="timed rounds of the llama.cpp ways")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="decode")
    args = parser.parse_args()
    models = ["shape:" + s for s in args.shapes] or [args.model]
    report_data = {"command": command_line(), "machine": machine(args.device), "commit": git_commit(),
                   "settings": {k: getattr(args, k) for k in ("sparsity", "batch", "prompt_tokens", "new_tokens", "repeats",
                                                              "llama_cpp_repeats", "dtype", "gguf_dtype")},
                   "results": []}
    out = Path(args.out)
    for model in models:
        report_data["results"].append(measure(model, args))
        write_json(out / f"{args.name}.json", report_data)
        text = (f"# {args.name}\n\n`{report_data['command']}`\n\n{report_data['machine']}, commit {report_data['commit']}\n\n"
                f"Prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens per row forced (no early stop); "
                f"each table's ways timed in turn, {args.repeats} rounds ({args.llama_cpp_repeats} for llama.cpp) after "
                "a warm-up, the median counts; the prefill is in the time.\n\n"
                f"{report(report_data['results'], args.device)}\n")
        write_text(out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()

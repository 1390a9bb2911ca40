"""``koff export``: a run folder in, a smaller backbone and one file set per memory out."""

from __future__ import annotations

import argparse

from koff.cli.common import log


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a physically pruned backbone and one file set per memory",
        description="Remove the pruned units for real and save the backbone as safetensors (per-layer widths in its "
        "config, or --uniform for a stock config), plus each memory: LoRA in PEFT format, the KV prefix as "
        "safetensors, and a manifest with the backbone's fingerprint.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="a finished `koff decompose` run folder")
    parser.add_argument("export_dir", metavar="EXPORT", help="where to write backbone/ and memories/ (the export folder)")
    parser.add_argument("--uniform", action="store_true", help="one width for every layer (loads in plain transformers, vLLM, PEFT)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty EXPORT")
    parser.add_argument("--router", action=argparse.BooleanOptionalAction, default=True,
                        help="write router.safetensors, which picks a memory for `model: auto` requests, from the "
                        "tokens of 32 blocks of each memory's training text (default: on)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest backbone safetensors file, e.g. 5GB or 500MB")
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                        help="gguf: also write EXPORT/gguf/ for llama.cpp: the backbone, and each memory's LoRA as an "
                        "adapter (a KV prefix has no GGUF form)")
    parser.add_argument("--gguf-dtype", choices=("f16", "f32", "q8_0"), default="f16", help="the GGUF backbone's matrices")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from koff.export import export_run

    summary = export_run(args.run_dir, args.export_dir, uniform=args.uniform, force=args.force,
                         max_shard_size=args.max_shard_size, router=args.router)
    ratio = summary["parameters"] / summary["dense_parameters"]
    print(f"backbone: {summary['parameters']:,} parameters ({ratio:.1%} of the dense {summary['dense_parameters']:,})")
    for name, memory in summary["memories"].items():
        print(f"memory {name}: {memory['parameters']:,} parameters, {memory['bytes'] / 1e6:.2f} MB")
    if args.format == "gguf":
        from pathlib import Path

        from koff.export.gguf import write_gguf

        for name, path in write_gguf(Path(args.export_dir), Path(args.export_dir) / "gguf", args.gguf_dtype).items():
            print(f"gguf {name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    log.info("wrote %s", args.export_dir)
    return 0

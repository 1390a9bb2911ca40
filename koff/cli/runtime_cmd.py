"""``koff generate`` and ``koff info``: use an exported folder."""

from __future__ import annotations

import argparse
import json
import sys

from koff.cli.common import add_runtime_options, log, markdown_table


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="stream a completion from an exported backbone + memory",
                                description="Generate text with an exported backbone and one of its memories (streamed).")
    gen.add_argument("export_dir", metavar="EXPORT", help="a `koff export` folder")
    gen.add_argument("prompt", help="the text to complete (with --chat: the user's message)")
    gen.add_argument("--memory", default=None,
                     help="memory name, or auto: the export's router picks one from the prompt (default: the bare backbone)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens of this probability (default: 1, all)")
    gen.add_argument("--seed", type=int, default=None, help="makes sampling repeatable (the same text alone or in any batch)")
    gen.add_argument("--stop", action="append", default=[], help="stop string, repeatable")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_runtime_options(gen)
    gen.set_defaults(func=generate)

    info = subparsers.add_parser("info", help="widths, parameter counts, sparsity and memories of an exported folder",
                                 description="Describe an exported koff folder.")
    info.add_argument("export_dir", metavar="EXPORT", help="a `koff export` folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=show_info)


def generate(args: argparse.Namespace) -> int:
    from koff.runtime import AUTO, Sampling, load

    Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed).validate()  # before the model loads
    runtime = load(args.export_dir, device=args.device, dtype=args.dtype, merge_lora=args.merge_lora,
                   compile=args.compile)
    prompt = args.prompt
    if args.chat:
        prompt = runtime.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
    memory = args.memory
    if memory == AUTO:
        (memory, confidence), = runtime.route(args.prompt)
        log.info("router: %s (confidence %.3f)", memory or "the bare backbone", confidence)
    for piece in runtime.generate(prompt, memory=memory, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, stop=args.stop, seed=args.seed,
                                  stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def show_info(args: argparse.Namespace) -> int:
    from koff.runtime import load

    info = load(args.export_dir).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    widths = info["layer_widths"]
    print(f"backbone: {info['folder']}  fingerprint {info['fingerprint'][:16]}  uniform={info['uniform']}")
    if info["parameters"]:
        print(f"parameters: {info['parameters']:,} of {info['dense_parameters']:,} dense "
              f"({1 - info['parameters'] / info['dense_parameters']:.2%} removed); block sparsity {info['sparsity']:.4f}")
    rows = [[i, f, g] for i, (f, g) in enumerate(zip(widths["intermediate_size"], widths["num_key_value_heads"]))]
    print(markdown_table(["layer", "FFN neurons", "KV groups"], rows))
    router = info["router"]
    print(f"router (memory=auto, {router['kind']}): {', '.join(router['memories'])}" if "memories" in router
          else f"router: off ({router['off']})")
    mem_rows = [[n, m["parameters"], m["lora_rank"], m["kv_slots"], f"{(m['bytes'] or 0) / 1e6:.2f}"] for n, m in info["memories"].items()]
    print(markdown_table(["memory", "parameters", "LoRA rank", "KV slots", "MB"], mem_rows or [["(none)", "", "", "", ""]]))
    return 0

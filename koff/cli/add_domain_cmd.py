"""``koff add-domain``: train one more memory on an exported backbone, beside the others."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from koff.cli.common import UsageError, log


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "add-domain",
        help="train a new memory on the frozen exported backbone",
        description="Train a memory for a new domain on an exported (already pruned) backbone, with the settings of "
        "the export's other memories, and write it to EXPORT/memories/NAME in the export format. --server URL then "
        "asks a running `koff serve` to load it.",
    )
    parser.add_argument("export_dir", metavar="EXPORT", help="a `koff export` folder")
    parser.add_argument("domain", metavar="NAME=SOURCE",
                        help="the new domain (SOURCE: a .txt file, a folder, a .jsonl, bundled:<iso639-3>, bundled:code/<lang>)")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the new memory (default: 200)")
    parser.add_argument("--block-len", type=int, default=None, help="(default: as the other memories were trained)")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per step (default: 4)")
    parser.add_argument("--lr-lora", type=float, default=None, help="learning rate of the LoRA factors (default: 1e-3)")
    parser.add_argument("--lr-kv", type=float, default=None, help="learning rate of the KV prefix (default: 1e-2)")
    parser.add_argument("--kv-slots", type=int, default=None, help="(default: as the other memories)")
    parser.add_argument("--lora-rank", type=int, default=None, help="(default: as the other memories)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data split, sampling and initialisation")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--server", metavar="URL", default=None, help="a running `koff serve` to load the memory into")
    parser.add_argument("--api-key", default=None, help="for --server (default: $KOFF_API_KEY)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from koff.training.add_domain import add_domain

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    overrides = {k: getattr(args, k) for k in ("block_len", "batch_size", "lr_lora", "lr_kv", "kv_slots", "lora_rank", "seed")}
    summary = add_domain(args.export_dir, args.domain, steps=args.steps, device=args.device, **overrides)
    print(f"memory {summary['name']}: {summary['parameters']:,} parameters, {summary['bytes'] / 1e6:.2f} MB, "
          f"{summary['steps']} steps -> {summary['folder']}")
    if args.server:
        # The server resolves a relative path inside its export's memories/, whatever its working directory.
        load_into_server(args.server, Path(summary["folder"]).name, args.api_key or os.environ.get("KOFF_API_KEY"))
    return 0


def load_into_server(url: str, folder: str, api_key: str | None) -> None:
    request = urllib.request.Request(url.rstrip("/") + "/v1/memories/load", data=json.dumps({"path": folder}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        raise UsageError(f"the memory was written, but {url} refused to load it ({err.code}): {detail}") from err
    except urllib.error.URLError as err:
        raise UsageError(f"the memory was written, but {url} could not be reached: {err.reason}") from err
    log.info("%s now serves %s", url, answer.get("id"))
    print(f"loaded into {url} as {answer.get('id')!r}")

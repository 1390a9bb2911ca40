"""Random-weight models at the shapes koff ships, for the speed and memory benchmarks (speed and
memory do not depend on the values, and nothing is downloaded)."""

from __future__ import annotations

import gc
import time

import torch
from transformers import AutoModelForCausalLM

from koff.data.blocks import DomainData
from koff.plan import read_model_config

DOMAINS = 5


def random_model(shape: str, dtype: torch.dtype, device: str, **changes):
    """A random model of a shipped shape, with ``changes`` to its config (e.g. a smaller width)."""
    config = read_model_config("shape:" + shape)
    config.update(changes)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False), config


def random_domains(vocab: int, block_len: int, blocks: int = 64) -> list[DomainData]:
    g = torch.Generator().manual_seed(0)
    return [DomainData(f"d{i}", "random", torch.randint(0, vocab, (blocks, block_len), generator=g),
                       torch.randint(0, vocab, (4, block_len), generator=g)) for i in range(DOMAINS)]


def word_tokenizer(vocab: int, eos: int):
    """A tokenizer with one word per id ("t0" ... "tN"): the random models have no real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", pad_token=f"t{eos}", unk_token="t0")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def greedy_tokens_per_s(generate, new_tokens: int, device: str) -> float:
    """Tokens/s of ``generate(n)`` making ``new_tokens`` tokens, after a short warm-up call."""
    generate(4)
    synchronize(device)
    start = time.perf_counter()
    generate(new_tokens)
    synchronize(device)
    return new_tokens / (time.perf_counter() - start)

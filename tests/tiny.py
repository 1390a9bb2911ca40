"""Tiny random-initialised models and a tiny tokenizer, built in memory for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "Der schnelle braune Fuchs springt über den faulen Hund. def add(a, b):\n    return a + b\n"
)


# Three small text domains: every test corpus is these lines repeated.
CORPUS = {
    "eng": "the cat sat on the mat and the dog ran over the hill while birds sang ",
    "deu": "der hund lief über den hügel und die katze saß auf der matte ",
    "code": "def f(x):\n    return x * 2 + 1\n\nfor i in range(10):\n    print(f(i))\n",
}


def write_corpus(folder: Path) -> dict[str, Path]:
    """``CORPUS`` written as ``folder/<name>.txt`` (each line 60 times); name -> path."""
    paths = {}
    for name, text in CORPUS.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text(text * 60)
    return paths


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with ~300 tokens, trained in milliseconds on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
}
# Gemma's sliding window, small enough that the tests' sequences run past it.
SLIDING_WINDOW = 8


def tiny_config(kind: str = "llama", vocab_size: int = 300, layers: int = 2):
    return CONFIGS[kind](
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=kind != "llama",
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
        **({"sliding_window": SLIDING_WINDOW} if kind.startswith("gemma") else {}),
    )


def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers=layers), dtype=torch.float32)
    if kind == "qwen2":  # give the q/k/v biases non-zero values so that pruning them is tested
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.normal_(0, 0.1)
    return model.eval()


def save_tiny(folder, kind: str = "llama", seed: int = 0, model=None) -> str:
    """A model folder with the tiny tokenizer: ``tiny_model(kind, seed)``, or ``model`` (e.g. one a test edited)."""
    (model if model is not None else tiny_model(kind, seed)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)

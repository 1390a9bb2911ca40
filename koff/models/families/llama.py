"""Llama and the families built as it is: Mistral, Qwen2 (biases on q/k/v) and Qwen3 (per-head
norms on queries and keys). Llama, Mistral and Qwen2 layers are what llama.cpp's per-layer GGUF
graph runs; Qwen3's query/key norms are not."""

from koff.models.adapter import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    gguf_model_types=("llama", "mistral", "qwen2"),
)

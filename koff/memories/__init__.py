from koff.memories.lora import RoutedLoRALinear, install_lora
from koff.memories.memory import DEFAULT_LORA_TARGETS, MEMORY_KINDS, DomainMemory, MemoryConfig
from koff.memories.prefix import build_prefix_cache, prefix_from_text
from koff.memories.batch import BatchMemories

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "MEMORY_KINDS",
    "DomainMemory",
    "MemoryConfig",
    "BatchMemories",
    "RoutedLoRALinear",
    "build_prefix_cache",
    "install_lora",
    "prefix_from_text",
]

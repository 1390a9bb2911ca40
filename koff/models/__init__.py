from koff.models.adapter import ArchitectureAdapter
from koff.models.architecture import (
    SUPPORTED_MODEL_TYPES,
    DecoderLayout,
    LayerParts,
    UnsupportedArchitectureError,
    decoder_layout,
)
from koff.models.loader import (
    DTYPE_CHOICES,
    EMBEDDED_MODELS,
    LoadedModel,
    ModelLoadError,
    load_model,
    load_tokenizer,
    model_folder,
    resolve_dtype,
)

__all__ = [
    "ArchitectureAdapter",
    "SUPPORTED_MODEL_TYPES",
    "DecoderLayout",
    "LayerParts",
    "UnsupportedArchitectureError",
    "decoder_layout",
    "DTYPE_CHOICES",
    "EMBEDDED_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "load_model",
    "load_tokenizer",
    "model_folder",
    "resolve_dtype",
]

from koff.models.architecture import (
    SUPPORTED_MODEL_TYPES,
    DecoderLayout,
    LayerParts,
    UnsupportedArchitectureError,
    decoder_layout,
)
from koff.models.loader import EMBEDDED_MODELS, LoadedModel, ModelLoadError, load_model

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DecoderLayout",
    "LayerParts",
    "UnsupportedArchitectureError",
    "decoder_layout",
    "EMBEDDED_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "load_model",
]

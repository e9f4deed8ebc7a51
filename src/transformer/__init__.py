"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), written from the paper."""

from .config import PRESETS, ModelConfig, preset
from .model.models import DecoderOnly, EncoderDecoder, EncoderOnly, build_model, count_parameters

__all__ = [
    "PRESETS", "ModelConfig", "preset", "build_model", "count_parameters",
    "EncoderDecoder", "EncoderOnly", "DecoderOnly",
]
__version__ = "0.1.0"

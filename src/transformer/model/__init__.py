"""The Transformer itself: attention, the KV cache, layers and the three assemblies.

It knows no loss, optimiser, search, precision policy or command line; `forward` returns logits.
"""

from transformer.model.cache import KVCache, LayerCache
from transformer.model.models import DecoderOnly, EncoderDecoder, EncoderOnly, build_model, count_parameters

__all__ = ["KVCache", "LayerCache", "EncoderDecoder", "EncoderOnly", "DecoderOnly", "build_model", "count_parameters"]

"""Drop-in layers: plain tensors in, plain tensors out."""

from hmoe.nn.multi_embedding import MultiEmbedding

__all__ = ["MultiEmbedding"]

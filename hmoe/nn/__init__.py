"""Drop-in layers: plain tensors in, plain tensors out."""

from hmoe.nn.mnse import MNSE
from hmoe.nn.multi_embedding import MultiEmbedding

__all__ = ["MNSE", "MultiEmbedding"]

"""hmoe: Heterogeneous Mixture-of-Experts with Multi-Embedding for ads recommendation.

Layers (hmoe.nn) sit on custom ops (hmoe.ops) with CPU C++, CUDA C++, Triton and pure-PyTorch
reference backends; ``python -m hmoe.info`` says which one runs where, and why.
"""

from hmoe import nn, ops, optim
from hmoe.ops import backend

__version__ = "0.1.0"
__all__ = ["backend", "nn", "ops", "optim", "__version__"]

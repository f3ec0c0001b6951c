r"""Multi-process training on TorchRec: the embedding sets sharded across ranks.

The only package of hmoe that imports TorchRec (an optional extra: see :func:`require`); nothing
below it does, so ``import hmoe`` and single-process training never need it.

How an HMoE model is distributed (DESIGN notes, "Scale out"):
- Each embedding group's categorical table, a MultiEmbedding (N, K, D), becomes TorchRec tables
  of K·D columns, one per categorical field (:class:`hmoe.distributed.embedding.ShardedTables`);
  a behaviour sequence reads its item field's table under a feature of its own, so its ids go
  through the same input distribution as the categorical ids. FBGEMM does the local lookup and
  the fused update in backward (SGD or row-wise Adagrad).
- TorchRec's DistributedModelParallel shards those tables (table-, row-, column-wise or data
  parallel, or as its planner chooses) and wraps the rest (experts, gates, towers, MNSE, TIM:
  small) in DistributedDataParallel.
"""

from __future__ import annotations

import importlib.util

__all__ = ["INSTALL", "available", "require"]

INSTALL = ("pip install 'hmoe[distributed]' && pip install --no-deps torchrec==1.8.0 "
           "(a plain 'pip install torchrec' pulls the CUDA build of fbgemm-gpu, which fails "
           "to load without a GPU; scripts/install_distributed.sh does both)")


def available() -> bool:
    """Whether TorchRec and FBGEMM can be imported (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torchrec", "fbgemm_gpu"))


def require() -> None:
    """ImportError with the install recipe unless TorchRec is importable."""
    if not available():
        raise ImportError(f"multi-process training needs TorchRec and FBGEMM: {INSTALL}")

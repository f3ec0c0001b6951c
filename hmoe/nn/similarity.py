r"""Pre-trained embeddings as MNSE features: similarity encoding and visual-semantic HashID.

Pan et al. 2024 (section 3.2, "Ads Recommendation in a Collapsed and Entangled World") do not
feed pre-trained vectors (GraphSage, LLM, vision) to the model directly: their geometry (cosine)
differs from that of learned ID embeddings (inner product). Instead:

Similarity encoding. For a user vector u and an item vector v (one pair per field f),

    s    = cos(u, v) = u·v / (|u| |v|)            in [-1, 1]; 0 if u or v is the zero vector
    code = round((s + 1) / 2 · (resolution - 1))  in [0, resolution - 1]
    out  = MNSE(code)                              (B, F, dim)

The resolution is not given by the paper; the default 1024 levels fill 10 binary digits.

Visual-semantic HashID. SimHash (sign random projections, Charikar 2002) of an item's embedding
x with a fixed Gaussian projection P (in_dim, num_bits):

    id = Σ_i [x·P[:, i] > 0] · 2^i                 in [0, 2^num_bits)

Two vectors at angle θ differ in each bit with probability θ / π, so similar items get ids at a
small Hamming distance. Encoded by ``MNSE(bases=(2,), max_values=2**num_bits - 1)``, the binary
digits of the id are exactly the hash bits, each with its own pair of learned rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hmoe.nn.mnse import MNSE
from hmoe.nn.quantize import KeepBufferDtypes

__all__ = ["SimHashID", "SimilarityEncoder", "cosine_similarity"]


def cosine_similarity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """cos(u, v) over the last axis, in [-1, 1], 0 where u or v is the zero vector.

    u, v (..., D) -> (...,), float32 (float64 for float64 input). NaN or inf in a vector gives
    NaN (MNSE then uses its missing vector).
    """
    dtype = torch.float64 if torch.float64 in (u.dtype, v.dtype) else torch.float32
    u, v = u.to(dtype), v.to(dtype)
    u_norm = torch.linalg.vector_norm(u, dim=-1)  # (...,)
    v_norm = torch.linalg.vector_norm(v, dim=-1)
    # Normalise each vector first: |u|·|v| could overflow or underflow where u·v would not.
    u_unit = u / torch.where(u_norm > 0, u_norm, 1.0).unsqueeze(-1)  # (..., D)
    v_unit = v / torch.where(v_norm > 0, v_norm, 1.0).unsqueeze(-1)
    return (u_unit * v_unit).sum(-1).clamp(-1.0, 1.0)  # zero vectors give 0; clamp keeps NaN


class SimilarityEncoder(nn.Module):
    """MNSE encoding of the quantised cosine similarity of user and item pre-trained vectors.

    Args:
        dim: output width per field (see hmoe.nn.MNSE; divisible by len(bases) in "concat").
        resolution: number of similarity levels, >= 2; codes lie in [0, resolution - 1].
        bases, mode: of the internal MNSE.
        user_table, item_table: frozen pre-trained tables (N_u, D), (N_i, D), or sequences of F
            such tables (one per field, field f's pair of equal width D_f). Stored as buffers
            (saved with the model, never trained). Given, forward takes ids; absent, vectors.
        num_fields: F without tables, the number of (user, item) vector pairs (default 1).
        num_sets: K embedding sets of the internal MNSE.

    forward(user, item):
        without tables: user, item (B, D) for F = 1, or (B, F, D): pre-trained vectors.
        with tables: user, item (B,) for F = 1, or (B, F): int ids into the tables.
    Returns (B, F, dim) (so (B, 1, dim) for one pair), or (K, B, F, dim) with K > 1 sets. No
    gradient flows to the vectors (the similarity is quantised); the MNSE weights train.

    Attributes: ``mnse`` (hmoe.nn.MNSE with F fields and max_values resolution - 1).
    """

    def __init__(
        self,
        dim: int,
        resolution: int = 1024,
        bases: Sequence[int] = (2, 3, 10),
        mode: str = "concat",
        user_table: torch.Tensor | Sequence[torch.Tensor] | None = None,
        item_table: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        num_fields: int | None = None,
        num_sets: int = 1,
    ):
        super().__init__()
        if resolution < 2:
            raise ValueError(f"resolution must be >= 2, got {resolution}")
        if (user_table is None) != (item_table is None):
            raise ValueError("give both user_table and item_table, or neither")
        self.resolution = int(resolution)
        self.num_tables = 0
        if user_table is not None:
            user_tables, item_tables = _table_list("user_table", user_table), \
                _table_list("item_table", item_table)
            if len(user_tables) != len(item_tables):
                raise ValueError(f"user_table and item_table must hold as many tables, got "
                                 f"{len(user_tables)} and {len(item_tables)}")
            if num_fields is not None and num_fields != len(user_tables):
                raise ValueError(f"num_fields ({num_fields}) must match the {len(user_tables)} "
                                 f"table pairs")
            for f, (u, i) in enumerate(zip(user_tables, item_tables)):
                if u.shape[1] != i.shape[1]:
                    raise ValueError(f"user_table and item_table of field {f} must have one width, "
                                     f"got {tuple(u.shape)} and {tuple(i.shape)}")
                self.register_buffer(f"user_table_{f}", u.detach().clone())  # (N_u, D_f)
                self.register_buffer(f"item_table_{f}", i.detach().clone())  # (N_i, D_f)
            self.num_tables = num_fields = len(user_tables)
        self.num_fields = 1 if num_fields is None else int(num_fields)
        if self.num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields}")
        self.mnse = MNSE(self.num_fields, dim, self.resolution - 1, bases, mode, num_sets)

    def tables(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (user_table, item_table) buffers of each field; empty without tables."""
        return [(getattr(self, f"user_table_{f}"), getattr(self, f"item_table_{f}"))
                for f in range(self.num_tables)]

    def similarity(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """The cosine similarity (B, F) of the forward inputs (vectors or ids, see the class)."""
        if self.num_tables:
            user_ids = self._ids("user", user)  # (B, F)
            item_ids = self._ids("item", item)
            if user_ids.shape[0] != item_ids.shape[0]:
                raise ValueError(f"user and item must have one batch size, got "
                                 f"{user_ids.shape[0]} and {item_ids.shape[0]}")
            return torch.stack([cosine_similarity(u_table[user_ids[:, f]], i_table[item_ids[:, f]])
                                for f, (u_table, i_table) in enumerate(self.tables())], dim=1)
        user, item = self._vectors("user", user), self._vectors("item", item)  # (B, F, D)
        if user.shape != item.shape:
            raise ValueError(f"user and item vectors must have one shape (B, F, D), got "
                             f"{tuple(user.shape)} and {tuple(item.shape)}")
        return cosine_similarity(user.detach(), item.detach())  # (B, F)

    def codes(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Float codes (B, F) = round((s + 1) / 2 · (resolution - 1)), NaN for a NaN vector."""
        similarity = self.similarity(user, item)  # (B, F)
        return torch.round((similarity + 1) / 2 * (self.resolution - 1))

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.mnse(self.codes(user, item))  # (B, F, dim) or (K, B, F, dim)

    def _vectors(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor of vectors (this encoder has "
                            f"no tables), got {getattr(x, 'dtype', type(x).__name__)}")
        if self.num_fields == 1 and x.dim() == 2:
            x = x.unsqueeze(1)  # (B, 1, D)
        if x.dim() != 3 or x.shape[1] != self.num_fields:
            raise ValueError(f"{name} must be (B, D) for one field or (B, F={self.num_fields}, D), "
                             f"got shape {tuple(x.shape)}")
        return x

    def _ids(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64 ids (this encoder has tables), got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if self.num_fields == 1 and ids.dim() == 1:
            ids = ids.unsqueeze(1)  # (B, 1)
        if ids.dim() != 2 or ids.shape[1] != self.num_fields:
            raise ValueError(f"{name} must be (B,) for one field or (B, F={self.num_fields}), "
                             f"got shape {tuple(ids.shape)}")
        if not torch.compiler.is_compiling() and ids.numel() > 0:
            for f, tables in enumerate(self.tables()):
                rows = tables[0 if name == "user" else 1].shape[0]
                low, high = int(ids[:, f].min()), int(ids[:, f].max())
                if low < 0 or high >= rows:
                    bad = low if low < 0 else high
                    raise ValueError(f"{name}: field {f} has id {bad}, outside [0, {rows}) of "
                                     f"{name}_table")
        return ids.long()

    def extra_repr(self) -> str:
        tables = f", tables={self.num_tables}" if self.num_tables else ""
        return f"resolution={self.resolution}, num_fields={self.num_fields}{tables}"


def _table_list(name: str, table: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    tables = [table] if isinstance(table, torch.Tensor) else list(table)
    if not tables:
        raise ValueError(f"{name} must be a tensor or a non-empty sequence of tensors")
    for f, t in enumerate(tables):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} (field {f}) must be a floating point (N, D) tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape "
                             f"{tuple(getattr(t, 'shape', ()))}")
    return tables


class SimHashID(KeepBufferDtypes):
    """SimHash ids of embeddings: bit i of the id is [x·P[:, i] > 0].

    Args:
        in_dim: D, the width of the embeddings.
        num_bits: 1..62 hash bits; ids lie in [0, 2**num_bits).
        seed: seeds a CPU torch.Generator that draws P, so one seed gives one P on every run and
            machine (P is then moved to ``device``).

    Buffers: ``projection`` (D, num_bits) float32, saved with the model; it stays float32 under
    ``.half()`` and the like, which would otherwise change the ids.

    forward(x): x (..., D) floating point, finite -> int64 ids (...): (B, D) gives (B,), and
    (B, F, D) gives (B, F), the shape hmoe.nn.MNSE takes (use ids[:, None] for one field).
    Pair with ``MNSE(F, dim, self.max_value, bases=(2,))``. A product of exactly 0 (e.g. a zero
    vector) gives bit 0.
    """

    def __init__(
        self,
        in_dim: int,
        num_bits: int,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        if not 1 <= num_bits <= 62:
            raise ValueError(f"num_bits must be in [1, 62] (ids are int64), got {num_bits}")
        self.in_dim, self.num_bits, self.seed = in_dim, num_bits, seed
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(in_dim, num_bits, generator=generator, dtype=torch.float32)
        self.register_buffer("projection", projection.to(device))  # (D, num_bits)
        self.register_buffer("powers", (2 ** torch.arange(num_bits, dtype=torch.int64)).to(device),
                             persistent=False)  # (num_bits,)

    @property
    def max_value(self) -> int:
        """The largest id, 2**num_bits - 1: the max_values of the MNSE that encodes the ids."""
        return 2 ** self.num_bits - 1

    def bits(self, x: torch.Tensor) -> torch.Tensor:
        """The hash bits (..., num_bits) bool of x (..., D), bit i = [x·P[:, i] > 0]."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must be (..., D={self.in_dim}), got shape {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite: NaN or inf has no hash")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.detach().to(dtype) @ self.projection.to(dtype) > 0  # (..., num_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bits(x).long() * self.powers).sum(-1)  # (...,) int64

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_bits={self.num_bits}, seed={self.seed}"

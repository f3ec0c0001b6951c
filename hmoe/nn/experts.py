r"""The HMoE experts: one feature interaction per embedding set, each followed by a ReLU MLP.

Design section 3.4 and paper notes sections 3.2-3.4 (HMoE-ME, Pan et al. 2024, after the
Multi-Embedding paper of Guo et al.). Every expert owns one embedding set and reads its field
embeddings

    x (B, F, D)  ->  expert(x) (B, H_out),   H_out = expert.out_dim

Each ends in a ReLU MLP: "there should be non-linearities such as ReLU after feature
interaction; otherwise, the model is equivalent to single-embedding" (notes 3.2), so every
output is >= 0.

MLP(in_dim, hidden): h ← Dropout(ReLU(W_k h + b_k)) for k = 1..len(hidden); out_dim = hidden[-1].

GwPFM (Group-weighted Part-aware FM, notes 3.3). The F fields fall in G groups, g(i) in [0, G).
Each feature keeps G parts of width d, "v_i = [v_i^(1); ...; v_i^(G)] ... The table dimension is
G·d": the input is read as x (B, F, G·d), part g of field i being x[:, i, g·d:(g+1)·d]. Pair
(i, j), i < j, uses the part of i dedicated to j's group and vice versa:

    GwPFM(x) = Σ_{i<j} r̄[g(i), g(j)] · v_i^(g(j)) ⊙ v_j^(g(i))      (B, d)  ->  MLP

r is a learnable (G, G) matrix initialised to 1, used through its symmetric part
r̄ = (r + rᵀ) / 2, so the strength of a group pair does not depend on which of the two fields is
listed first (r̄ = r at initialisation, and r̄ = r whenever r is symmetric). Entries of r for a
group pair with no field pair (the diagonal of a one-field group) are never used and get no
gradient. G = 1 gives a field-weighted FM r[0,0] · Σ_{i<j} v_i ⊙ v_j; G = F gives FFM with
FwFM-style pair weights.

IPNN (product-based network, inner products):

    [flatten x ; ⟨x_i, x_j⟩_{i<j}]   (B, F·D + F(F-1)/2)  ->  MLP

in the row-major pair order of torch.triu_indices(F, F, 1): (0,1), (0,2), ..., (F-2, F-1).

CrossLayerV2 (DCN V2, Wang et al. 2021, eq. 1), on x_0, x_l (B, N):

    x_{l+1} = x_0 ⊙ (W x_l + b) + x_l,   W (N, N) full rank, or W = U Vᵀ with U, V (N, r)

DCNv2 on x_0 = flatten x (B, F·D):
    "stacked":  MLP(Cross_L(... Cross_1(x_0)))                                        (B, H)
    "parallel": ReLU(W_out [Cross_L(... Cross_1(x_0)) ; MLP(x_0)] + b_out)            (B, H)
with H = hidden[-1]; the parallel form's final ReLU layer keeps the rule that an expert ends in
a ReLU MLP (a bare concatenation would pass the linear cross output through).

FlatDNN: MLP(flatten x)  (B, hidden[-1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CrossLayerV2", "DCNv2", "FlatDNN", "GwPFM", "IPNN", "MLP"]

STRUCTURES = ("stacked", "parallel")
DEFAULT_HIDDEN = (400,)  # the Multi-Embedding code's per-set Linear(·, 400) + ReLU (notes 3.2)


def _check_fields(x, num_fields: int, dim: int) -> None:
    """x must be a floating-point (B, F=num_fields, D=dim) tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[1] != num_fields or x.shape[2] != dim:
        raise ValueError(f"x must be (B, F={num_fields}, D={dim}), got shape {tuple(x.shape)}")


def _check_sizes(num_fields: int, dim: int, min_fields: int = 1) -> None:
    if num_fields < min_fields:
        raise ValueError(f"num_fields must be >= {min_fields}, got {num_fields}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")


class MLP(nn.Module):
    """Linear + ReLU (+ Dropout) per hidden width; out_dim = hidden[-1], outputs >= 0.

    Args:
        in_dim: width of the input (..., in_dim).
        hidden: non-empty widths of the layers.
        dropout: after each ReLU, in [0, 1) (training only).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of widths >= 1, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, hidden[-1]
        layers = []
        for a, b in zip((in_dim, *hidden[:-1]), hidden):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (..., out_dim)


class GwPFM(nn.Module):
    """Group-weighted part-aware FM, then an MLP (see the module docstring).

    Args:
        num_fields: F >= 2.  dim: D = G·d, the width of one field's embedding (all G parts).
        field_groups: F group ids; the groups must be exactly 0..G-1, each holding a field.
        hidden, dropout: of the MLP on the (B, d) interaction vector.

    Parameters: ``r`` (G, G), initialised to 1, used as (r + rᵀ)/2; ``mlp``.
    Buffers (index tensors over the P = F(F-1)/2 pairs): ``left_field``, ``right_field``,
    ``left_part`` (= g(right_field)), ``right_part`` (= g(left_field)).

    forward(x (B, F, D)) -> (B, hidden[-1]); ``interaction(x)`` -> (B, d), before the MLP.
    """

    def __init__(self, num_fields: int, dim: int, field_groups: Sequence[int],
                 hidden: Sequence[int] = DEFAULT_HIDDEN, dropout: float = 0.0):
        super().__init__()
        _check_sizes(num_fields, dim, min_fields=2)
        groups = tuple(int(g) for g in field_groups)
        if len(groups) != num_fields:
            raise ValueError(f"field_groups must have num_fields={num_fields} entries, "
                             f"got {len(groups)}")
        num_groups = len(set(groups))
        if set(groups) != set(range(num_groups)):
            raise ValueError(f"field_groups must use exactly the ids 0..G-1 (no empty group), "
                             f"got {groups}")
        if dim % num_groups:
            raise ValueError(f"dim must be G·d: divisible by the G={num_groups} groups, got {dim}")
        self.num_fields, self.dim, self.num_groups = num_fields, dim, num_groups
        self.field_groups, self.part_dim = groups, dim // num_groups
        self.r = nn.Parameter(torch.ones(num_groups, num_groups))
        group_of = torch.tensor(groups)
        left, right = torch.triu_indices(num_fields, num_fields, 1)  # (P,), (P,)
        self.register_buffer("left_field", left, persistent=False)
        self.register_buffer("right_field", right, persistent=False)
        self.register_buffer("left_part", group_of[right], persistent=False)
        self.register_buffer("right_part", group_of[left], persistent=False)
        self.mlp = MLP(self.part_dim, hidden, dropout)
        self.out_dim = self.mlp.out_dim

    def interaction(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_{i<j} r̄[g(i), g(j)] · v_i^(g(j)) ⊙ v_j^(g(i)), (B, d)."""
        _check_fields(x, self.num_fields, self.dim)
        B = x.shape[0]
        parts = x.reshape(B, self.num_fields, self.num_groups, self.part_dim)  # (B, F, G, d)
        left = parts[:, self.left_field, self.left_part]  # (B, P, d): v_i^(g(j))
        right = parts[:, self.right_field, self.right_part]  # (B, P, d): v_j^(g(i))
        r_sym = (self.r + self.r.T) / 2  # (G, G)
        strength = r_sym[self.right_part, self.left_part].to(x.dtype)  # (P,): r̄[g(i), g(j)]
        return torch.einsum("p,bpd->bd", strength, left * right)  # (B, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.interaction(x))  # (B, out_dim)

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, dim={self.dim}, groups={self.num_groups}, "
                f"part_dim={self.part_dim}")


class IPNN(nn.Module):
    """Flattened embeddings and all pairwise inner products, then an MLP.

    Args: num_fields F, dim D, hidden and dropout of the MLP on (B, F·D + F(F-1)/2).
    Buffers: ``left_field``, ``right_field`` (P,), the pairs i < j of torch.triu_indices.

    forward(x (B, F, D)) -> (B, hidden[-1]); ``inner_products(x)`` -> (B, P).
    """

    def __init__(self, num_fields: int, dim: int, hidden: Sequence[int] = DEFAULT_HIDDEN,
                 dropout: float = 0.0):
        super().__init__()
        _check_sizes(num_fields, dim)
        self.num_fields, self.dim = num_fields, dim
        left, right = torch.triu_indices(num_fields, num_fields, 1)  # (P,), (P,)
        self.register_buffer("left_field", left, persistent=False)
        self.register_buffer("right_field", right, persistent=False)
        self.num_pairs = left.numel()
        self.mlp = MLP(num_fields * dim + self.num_pairs, hidden, dropout)
        self.out_dim = self.mlp.out_dim

    def inner_products(self, x: torch.Tensor) -> torch.Tensor:
        """⟨x_i, x_j⟩ for i < j, (B, P)."""
        _check_fields(x, self.num_fields, self.dim)
        gram = torch.bmm(x, x.transpose(1, 2))  # (B, F, F)
        return gram[:, self.left_field, self.right_field]  # (B, P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        products = self.inner_products(x)  # (B, P)
        features = torch.cat([x.flatten(1), products], dim=1)  # (B, F·D + P)
        return self.mlp(features)  # (B, out_dim)

    def extra_repr(self) -> str:
        return f"num_fields={self.num_fields}, dim={self.dim}, pairs={self.num_pairs}"


class CrossLayerV2(nn.Module):
    """One DCN V2 cross layer, x_{l+1} = x_0 ⊙ (W x_l + b) + x_l, on (B, N) inputs.

    Args:
        in_dim: N.
        low_rank: None for a full W (N, N); r >= 1 for W = U Vᵀ, U and V (N, r).

    Parameters: ``weight`` (N, N) when full, else ``u`` and ``v`` (N, r); ``bias`` (N,), zero
    at initialisation (as in DCN V2). forward(x0 (B, N), xl (B, N)) -> (B, N).
    """

    def __init__(self, in_dim: int, low_rank: int | None = None):
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        if low_rank is not None and low_rank < 1:
            raise ValueError(f"low_rank must be None or >= 1, got {low_rank}")
        self.in_dim, self.low_rank = in_dim, low_rank
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's fan-in scale
        if low_rank is None:
            self.weight = nn.Parameter(torch.empty(in_dim, in_dim).uniform_(-bound, bound))
        else:
            self.u = nn.Parameter(torch.empty(in_dim, low_rank).uniform_(
                -1.0 / math.sqrt(low_rank), 1.0 / math.sqrt(low_rank)))
            self.v = nn.Parameter(torch.empty(in_dim, low_rank).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(in_dim))

    def forward(self, x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        if x0.shape != xl.shape or x0.dim() != 2 or x0.shape[1] != self.in_dim:
            raise ValueError(f"x0 and xl must both be (B, {self.in_dim}), got shapes "
                             f"{tuple(x0.shape)} and {tuple(xl.shape)}")
        if self.low_rank is None:
            projected = xl @ self.weight.T  # (B, N): W x_l
        else:
            projected = (xl @ self.v) @ self.u.T  # (B, r) -> (B, N): U (Vᵀ x_l)
        return x0 * (projected + self.bias) + xl  # (B, N)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, low_rank={self.low_rank}"


class DCNv2(nn.Module):
    """DCN V2 on the flattened embeddings, stacked or parallel (see the module docstring).

    Args:
        num_fields: F.  dim: D.  num_cross: L >= 1 cross layers on N = F·D.
        low_rank: None (full W) or the rank r of every cross layer.
        structure: "stacked" (cross layers, then the MLP) or "parallel" (cross layers beside the
            MLP, concatenated, then Linear(N + H, H) + ReLU as ``output``).
        hidden, dropout: of the MLP; out_dim = hidden[-1].

    forward(x (B, F, D)) -> (B, hidden[-1]); ``cross(x)`` -> (B, F·D), the cross tower's output.
    """

    def __init__(self, num_fields: int, dim: int, num_cross: int = 2,
                 low_rank: int | None = None, structure: str = "stacked",
                 hidden: Sequence[int] = DEFAULT_HIDDEN, dropout: float = 0.0):
        super().__init__()
        _check_sizes(num_fields, dim)
        if num_cross < 1:
            raise ValueError(f"num_cross must be >= 1, got {num_cross}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.num_fields, self.dim, self.structure = num_fields, dim, structure
        width = num_fields * dim
        self.cross_layers = nn.ModuleList(CrossLayerV2(width, low_rank) for _ in range(num_cross))
        self.mlp = MLP(width, hidden, dropout)
        self.out_dim = self.mlp.out_dim
        if structure == "parallel":
            self.output = nn.Sequential(nn.Linear(width + self.out_dim, self.out_dim), nn.ReLU())

    def cross(self, x: torch.Tensor) -> torch.Tensor:
        _check_fields(x, self.num_fields, self.dim)
        x0 = x.flatten(1)  # (B, N)
        xl = x0
        for layer in self.cross_layers:
            xl = layer(x0, xl)  # (B, N)
        return xl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crossed = self.cross(x)  # (B, N)
        if self.structure == "stacked":
            return self.mlp(crossed)  # (B, H)
        deep = self.mlp(x.flatten(1))  # (B, H)
        return self.output(torch.cat([crossed, deep], dim=1))  # (B, H)

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, dim={self.dim}, structure={self.structure!r}, "
                f"cross_layers={len(self.cross_layers)}")


class FlatDNN(nn.Module):
    """The MLP on the flattened embeddings (B, F·D).

    Args: num_fields F, dim D, hidden and dropout of the MLP.
    forward(x (B, F, D)) -> (B, hidden[-1]).
    """

    def __init__(self, num_fields: int, dim: int, hidden: Sequence[int] = DEFAULT_HIDDEN,
                 dropout: float = 0.0):
        super().__init__()
        _check_sizes(num_fields, dim)
        self.num_fields, self.dim = num_fields, dim
        self.mlp = MLP(num_fields * dim, hidden, dropout)
        self.out_dim = self.mlp.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_fields(x, self.num_fields, self.dim)
        return self.mlp(x.flatten(1))  # (B, out_dim)

    def extra_repr(self) -> str:
        return f"num_fields={self.num_fields}, dim={self.dim}"

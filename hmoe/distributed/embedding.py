r"""One embedding group's categorical tables as TorchRec tables, for sharding.

An EmbeddingGroup of K sets of dim D looks up every categorical field and every behaviour
sequence in one MultiEmbedding (N, K, D) (hmoe.models.hmoe). Here the same rows live in TorchRec
tables, one per categorical field f:

    table "t<f>_<name>"   vocab_f rows x K·D columns; row i = MultiEmbedding.weight[offset_f + i]
                          flattened (K, D) -> K·D, so set k is columns [k·D, (k + 1)·D)
    features              "f<f>": field f's id, one per row; "s<i>": the valid steps of
                          sequence i, whose item field's table it reads

so a sequence's ids take the same input distribution (all-to-all) as the categorical ids, and
the sharded lookup returns what MultiEmbedding returns: (K, B, F_c, D) and (K, B, L, D) per
sequence (zeros at padded steps, which no sequence encoder reads). Why K·D columns and FBGEMM
rather than a TorchRec sharder around hmoe's own kernel: DESIGN notes, "Scale out".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from hmoe.data.schema import Schema
from hmoe.distributed import require
from hmoe.nn import MultiEmbedding

__all__ = ["ShardedTables", "table_name"]


def table_name(field: int, name: str) -> str:
    return f"t{field}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"


class ShardedTables(nn.Module):
    """Stands in for an EmbeddingGroup's MultiEmbedding (``group.categorical``): ``lookup``
    gives the group the same embeddings from a TorchRec EmbeddingCollection, which
    DistributedModelParallel can shard.

    Args:
        schema: the dataset schema (categorical fields with vocab sizes, sequences).
        num_sets, dim: K and D of the group.
        init_std: standard deviation of the normal initialisation (as MultiEmbedding's).
        device: where the tables are made ("meta" to let DistributedModelParallel place them).
    """

    def __init__(self, schema: Schema, num_sets: int, dim: int, *, init_std: float = 1e-2,
                 device: torch.device | str | None = None):
        require()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        super().__init__()
        if not schema.categorical:
            raise ValueError("schema: no categorical fields to put in tables")
        self.num_sets, self.dim = num_sets, dim
        self.vocab_sizes = [int(f.vocab_size) for f in schema.categorical]
        self.field_names = [f.name for f in schema.categorical]
        self.sequence_names = [s.name for s in schema.sequence]
        self.item_fields = [schema.categorical_index(s.item) for s in schema.sequence]
        self.table_names = [table_name(f, name) for f, name in enumerate(self.field_names)]
        configs, self.feature_order = [], []
        for f, (name, vocab) in enumerate(zip(self.table_names, self.vocab_sizes)):
            features = [f"f{f}"] + [f"s{i}" for i, item in enumerate(self.item_fields)
                                    if item == f]
            self.feature_order += features  # a KeyedJaggedTensor's keys must come in this order
            configs.append(EmbeddingConfig(name=name, embedding_dim=num_sets * dim,
                                           num_embeddings=vocab, feature_names=features,
                                           init_fn=partial(nn.init.normal_, std=init_std)))
        self.collection = EmbeddingCollection(tables=configs, device=torch.device(device)
                                              if device is not None else None)
        self.register_buffer("vocab", torch.tensor(self.vocab_sizes), persistent=False)

    @classmethod
    def from_multi_embedding(cls, table: MultiEmbedding, schema: Schema) -> ShardedTables:
        """Tables holding ``table``'s rows (same values: the sharded model starts where the
        single-process one is)."""
        tables = cls(schema, table.num_sets, table.dim, device=table.weight.device)
        tables.load_rows(table.weight.detach())
        return tables

    def rows_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """A MultiEmbedding weight (N, K, D) -> the state dict of ``collection`` (one
        (vocab_f, K·D) tensor per table): what to load after sharding."""
        expected = (sum(self.vocab_sizes), self.num_sets, self.dim)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight: expected shape {expected}, got {tuple(weight.shape)}")
        state, start = {}, 0
        for name, vocab in zip(self.table_names, self.vocab_sizes):
            state[f"embeddings.{name}.weight"] = \
                weight[start:start + vocab].reshape(vocab, -1).clone()
            start += vocab
        return state

    def load_rows(self, weight: torch.Tensor) -> None:
        """Copies a MultiEmbedding weight (N, K, D) into the (unsharded) tables."""
        self.collection.load_state_dict(self.rows_state(weight))

    @staticmethod
    def weight_from_state(state: Mapping[str, torch.Tensor], table_names, num_sets: int,
                          dim: int) -> torch.Tensor:
        """The inverse of :meth:`rows_state`: full (vocab_f, K·D) tables -> (N, K, D)."""
        parts = [state[f"embeddings.{name}.weight"] for name in table_names]
        return torch.cat([p.reshape(p.shape[0], num_sets, dim) for p in parts])

    @staticmethod
    def _first_bad(ids: torch.Tensor, vocab: torch.Tensor) -> list[int] | None:
        """The index of the first id outside [0, vocab), or None (also while compiling)."""
        if torch.compiler.is_compiling() or not ids.numel():
            return None
        bad = (ids < 0) | (ids >= vocab)
        return bad.nonzero()[0].tolist() if bool(bad.any()) else None

    def lookup(self, batch: Mapping[str, torch.Tensor]):
        """((K, B, F_c, D) field embeddings, [(K, B, L_i, D) behaviours per sequence]), as
        EmbeddingGroup's MultiEmbedding lookup gives them."""
        from torchrec import KeyedJaggedTensor

        ids = batch["categorical"].to(torch.int64)  # (B, F)
        B, F = ids.shape
        if F != len(self.vocab_sizes):
            raise ValueError(f"batch['categorical']: expected {len(self.vocab_sizes)} fields, "
                             f"got {F}")
        bad = self._first_bad(ids, self.vocab)
        if bad is not None:
            sample, field = bad
            raise IndexError(f"batch['categorical']: sample {sample}, field "
                             f"{self.field_names[field]!r} holds id {int(ids[sample, field])}, "
                             f"outside [0, {self.vocab_sizes[field]})")
        ones = torch.ones(B, dtype=torch.int64, device=ids.device)
        jagged = {f"f{f}": (ids[:, f], ones) for f in range(F)}  # key -> (values, lengths)
        steps = []
        for i, name in enumerate(self.sequence_names):
            seq = batch[f"seq/{name}"].to(torch.int64)  # (B, L)
            seq_lengths = batch[f"seq/{name}/lengths"].to(torch.int64)  # (B,)
            valid = torch.arange(seq.shape[1], device=seq.device) < seq_lengths[:, None]
            picked = seq[valid]  # row-major: row 0's valid steps, row 1's, ...
            bad = self._first_bad(picked, self.vocab[self.item_fields[i]])
            if bad is not None:
                raise IndexError(f"batch['seq/{name}']: a valid step holds id "
                                 f"{int(picked[bad[0]])}, outside [0, "
                                 f"{self.vocab_sizes[self.item_fields[i]]})")
            jagged[f"s{i}"] = (picked, seq_lengths)
            steps.append((seq.shape[1], valid.reshape(-1).nonzero().squeeze(1)))
        features = KeyedJaggedTensor(
            keys=self.feature_order,
            values=torch.cat([jagged[key][0] for key in self.feature_order]),
            lengths=torch.cat([jagged[key][1] for key in self.feature_order]))
        out = self.collection(features)  # {feature: JaggedTensor of (nnz, K·D) values}
        K, D = self.num_sets, self.dim
        fields = torch.stack([out[f"f{f}"].values() for f in range(F)], dim=1)  # (B, F, K·D)
        categorical = fields.view(B, F, K, D).permute(2, 0, 1, 3)  # (K, B, F, D)
        behaviours = []
        for i, (L, where) in enumerate(steps):
            rows = out[f"s{i}"].values()  # (nnz, K·D)
            padded = rows.new_zeros(B * L, K * D).index_copy(0, where, rows)
            behaviours.append(padded.view(B, L, K, D).permute(2, 0, 1, 3))  # (K, B, L, D)
        return categorical, behaviours

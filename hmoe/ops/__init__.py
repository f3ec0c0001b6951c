"""The op boundary: every hot path as a torch.ops.hmoe custom op with four backends.

Each op module (hmoe/ops/<op>.py) holds, in order: the math and shapes, the pure-PyTorch
reference ``<op>_ref``, the fake kernels and autograd of the compiled op, and the public function
that validates its arguments once and dispatches to the selected backend (see _backend.py).

Dimension letters: B batch, F fields, K embedding sets, D embedding dim, L sequence length,
N table rows, R digit-code rows, E experts, T tasks, H heads.
"""

from hmoe.ops._backend import BACKENDS, BackendUnavailable, backend, reasons, select
from hmoe.ops.id_remap import IdRemapState, id_remap, id_remap_ref
from hmoe.ops.mnse import mnse, mnse_ref
from hmoe.ops.multi_embedding import FusedUpdate, multi_embedding, multi_embedding_ref
from hmoe.ops.tim_attention import tim_attention, tim_attention_ref

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "FusedUpdate",
    "IdRemapState",
    "backend",
    "id_remap",
    "id_remap_ref",
    "mnse",
    "mnse_ref",
    "multi_embedding",
    "multi_embedding_ref",
    "reasons",
    "select",
    "tim_attention",
    "tim_attention_ref",
]

"""hmoe.ops.id_remap on the CUDA C++ backend against the OrderedDict reference, batch by batch.

Skipped without a CUDA device. On a machine with one, a CUDA backend that is not available
(hmoe._C built without CUDA) fails loudly instead of skipping, so a broken build cannot pass.
No hypothesis here: the GPU machine does not have it.
"""

import importlib

import numpy as np
import pytest
import torch

import hmoe

ir = importlib.import_module("hmoe.ops.id_remap")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def cuda_backend_available():
    reason = hmoe.ops.reasons("id_remap", "cuda")["cuda"]
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the CUDA backend cannot run: {reason}")


def zipf_batches(seed, num_batches, batch, universe, exponent=1.3, shape=None):
    rng = np.random.default_rng(seed)
    scramble = rng.integers(-(2**63) + 1, 2**63 - 1, size=universe, dtype=np.int64)
    out = []
    for i in range(num_batches):
        n = 0 if i == 3 else int(rng.integers(1, batch + 1))  # batch 3 is empty
        ids = torch.from_numpy(scramble[np.minimum(rng.zipf(exponent, size=n), universe) - 1])
        out.append(ids.reshape(-1, shape) if shape and n % shape == 0 and n else ids)
    return out


def compare(state, vocab, batches, min_count):
    for i, ids in enumerate(batches):
        with hmoe.ops.backend("cuda"):
            rows, assigned = ir.id_remap(state, ids.to(DEVICE), min_count)
        want_rows, want_assigned = ir.id_remap_ref(vocab, ids, min_count)
        assert rows.device.type == "cuda" and rows.shape == ids.shape
        assert torch.equal(rows.cpu(), want_rows), f"rows of batch {i}"
        assert torch.equal(assigned.cpu(), want_assigned), f"assigned of batch {i}"
    assert ir.decode_state(state) == vocab


@pytest.mark.parametrize("capacity,pending_capacity,min_count", [
    (1, 1, 1), (3, 2, 1), (7, 3, 3), (40, 40, 1), (16, 64, 2), (500, 300, 2),
])
def test_cuda_matches_reference(capacity, pending_capacity, min_count):
    batches = zipf_batches(capacity + min_count, 40, 300, universe=2000, shape=3)
    compare(ir.new_state(capacity, pending_capacity, device=DEVICE),
            ir.VocabState(capacity, pending_capacity), batches, min_count)


def test_state_moves_between_devices_mid_stream():
    batches = zipf_batches(5, 30, 200, universe=800)
    vocab = ir.VocabState(50, 20)
    state = ir.new_state(50, 20)
    for ids in batches[:10]:  # CPU kernel (or reference) first
        ir.id_remap(state, ids, 2)
        ir.id_remap_ref(vocab, ids, 2)
    state = ir.IdRemapState(*(x.to(DEVICE) for x in state))
    compare(state, vocab, batches[10:], 2)


def test_cuda_rejects_the_reserved_id():
    state = ir.new_state(4, device=DEVICE)
    with pytest.raises(ValueError, match="reserved id"):
        torch.ops.hmoe.id_remap(*state, torch.tensor([3, -(2**63)], device=DEVICE), 1)
    assert state.meta.tolist()[0] == 0

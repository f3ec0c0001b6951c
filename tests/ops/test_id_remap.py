"""hmoe.ops.id_remap: the spec pinned by hand-worked examples, then every CPU-runnable backend
against the OrderedDict reference on random streams, batch by batch (rows, assigned and the
whole decoded state), with the tensor state's invariants checked after every call.

The CUDA kernel is tested in test_id_remap_cuda.py (skipped without a GPU).
"""

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hmoe
from hmoe.data.hashing import mix64 as mix64_numpy

ir = importlib.import_module("hmoe.ops.id_remap")

CPU_BACKENDS = [b for b in ("reference", "cpu") if hmoe.ops.reasons("id_remap", "cpu")[b] is None]
needs_cpu_kernel = pytest.mark.skipif(
    hmoe.ops.reasons("id_remap", "cpu")["cpu"] is not None,
    reason="hmoe._C has no id_remap CPU kernel",
)
I64_MAX = 2**63 - 1


def t(values):
    return torch.tensor(values, dtype=torch.int64)


def spec_run(capacity, pending_capacity, min_count, batches):
    """The reference on a stream: [(rows, assigned) as lists] and the final VocabState."""
    vocab = ir.VocabState(capacity, pending_capacity)
    out = []
    for batch in batches:
        rows, assigned = ir.id_remap_ref(vocab, t(batch), min_count)
        out.append((rows.tolist(), assigned.tolist()))
    return out, vocab


def check_invariants(state: ir.IdRemapState) -> ir.VocabState:
    """The tensor state is well formed: every key sits in its probe run and names a node that
    holds it, the keys are exactly the admitted and pending ids, meta agrees with the lists, the
    rows in use are 1..len(admitted) and the free stack holds the other pending nodes."""
    vocab = ir.decode_state(state)
    table, nodes, meta = (x.cpu().tolist() for x in state)
    clock, rows_used, pending_size, free_top, C, P = meta
    S = len(table)
    homes = (ir.mix64(t([k for k, _ in table if k != ir.SENTINEL] or [0])) & (S - 1)).tolist()
    keys = {}
    occupied = [k != ir.SENTINEL for k, _ in table]
    homes_iter = iter(homes)
    for slot, (key, node) in enumerate(table):
        if key == ir.SENTINEL:
            continue
        home = next(homes_iter)
        s = home
        while s != slot:  # no free slot between the key's home and its slot
            assert occupied[s], (key, home, slot)
            s = (s + 1) % S
        assert nodes[node][0] == key
        keys[key] = node
    assert set(keys) == set(vocab.admitted) | set(vocab.pending)
    assert all(keys[u] == r for u, r in vocab.admitted.items())
    assert sorted(vocab.admitted.values()) == list(range(1, rows_used + 1))
    assert pending_size == len(vocab.pending) and all(C < keys[u] <= C + P for u in vocab.pending)
    free, n = 0, free_top
    while n != -1:
        assert C < n <= C + P and n not in keys.values()
        free, n = free + 1, nodes[n][3]
    assert free == P - pending_size
    assert clock == vocab.clock
    return vocab


def run_stream(backend_name, capacity, pending_capacity, min_count, batches, device="cpu"):
    """Runs the stream on one backend and on the reference side by side, comparing every call."""
    state = ir.new_state(capacity, pending_capacity, device=device)
    vocab = ir.VocabState(capacity, pending_capacity)
    for i, batch in enumerate(batches):
        ids = batch if isinstance(batch, torch.Tensor) else t(batch)
        with hmoe.ops.backend(backend_name):
            rows, assigned = ir.id_remap(state, ids.to(device), min_count)
        want_rows, want_assigned = ir.id_remap_ref(vocab, ids, min_count)
        assert rows.shape == ids.shape and rows.dtype == torch.int64 and assigned.dtype == torch.int64
        assert rows.cpu().tolist() == want_rows.tolist(), f"rows of batch {i}"
        assert assigned.cpu().tolist() == want_assigned.tolist(), f"assigned of batch {i}"
        assert check_invariants(state) == vocab, f"state after batch {i}"
    return state, vocab


# --------------------------------------------------------------------------------------------
# The spec, by hand.


def test_lru_eviction_takes_the_least_recently_seen_row():
    out, vocab = spec_run(2, 2, 1, [[10], [20], [30], [20, 40]])
    assert out == [([1], [1]), ([2], [2]), ([1], [1]),  # 30 evicts 10 (least recent)
                   ([2, 1], [1])]  # 20 is touched, so 40 evicts 30, not 20
    assert list(vocab.admitted.items()) == [(20, 2), (40, 1)]


def test_touches_follow_first_occurrence_order():
    # After [1, 2, 3] then [3, 1] the LRU order is 2, 3, 1: 4 and 5 evict 2 then 3.
    out, vocab = spec_run(3, 3, 1, [[1, 2, 3], [3, 1, 3], [4, 5]])
    assert out[2] == ([2, 3], [2, 3])
    assert list(vocab.admitted) == [1, 4, 5]


def test_a_batch_that_uses_every_row_leaves_the_rest_pending():
    # capacity 2: 3 would evict 1, but 1 is in this batch, so 3 stays pending (row 0).
    out, vocab = spec_run(2, 2, 1, [[1, 2, 3, 3], [3]])
    assert out[0] == ([1, 2, 0, 0], [1, 2])
    assert vocab.pending == {} and out[1] == ([1], [1])  # next call: 1 is not seen, 3 takes row 1


def test_admission_after_min_count_across_and_within_batches():
    out, _ = spec_run(4, 4, 3, [[7], [7, 8], [7, 8, 8], [9, 9, 9]])
    assert [rows for rows, _ in out] == [[0], [0, 0], [1, 2, 2], [3, 3, 3]]
    assert [a for _, a in out] == [[], [], [1, 2], [3]]


def test_admissions_follow_first_occurrence_order_of_the_pending_ids():
    out, _ = spec_run(5, 5, 2, [[1, 2, 3], [3, 2, 1, 4, 4]])
    assert out[1] == ([1, 2, 3, 4, 4], [1, 2, 3, 4])


def test_pending_overflow_drops_the_least_recently_seen_count():
    out, vocab = spec_run(4, 2, 2, [[1], [2], [3], [1], [2]])
    assert [rows for rows, _ in out] == [[0], [0], [0], [0], [0]]  # 1's count was dropped by 3
    assert list(vocab.pending.items()) == [(1, 1), (2, 1)]  # 3 dropped by 2, then 2 counted anew
    out, _ = spec_run(4, 2, 2, [[1], [2], [2], [1]])
    assert out[2] == ([1], [1])  # no overflow: 2 admitted at its second sighting


def test_an_evicted_id_is_forgotten_and_gets_a_fresh_count_and_row():
    out, vocab = spec_run(1, 4, 2, [[1, 1], [2, 2], [1], [1], [3]])
    assert out == [([1, 1], [1]), ([1, 1], [1]), ([0], []), ([1], [1]), ([0], [])]
    assert list(vocab.admitted.items()) == [(1, 1)] and dict(vocab.pending) == {3: 1}


def test_a_new_id_is_counted_in_the_pending_table_even_when_admitted_at_once():
    # pending_capacity 1: 2 is blocked (1 in the batch) and pending; 3's entry drops it.
    out, vocab = spec_run(1, 1, 1, [[1, 2], [3], [2]])
    assert out == [([1, 0], [1]), ([1], [1]), ([1], [1])]
    assert list(vocab.admitted) == [2] and not vocab.pending


def test_empty_batches_tick_the_clock_only():
    out, vocab = spec_run(2, 2, 1, [[], [5], []])
    assert out == [([], []), ([1], [1]), ([], [])] and vocab.clock == 3


# --------------------------------------------------------------------------------------------
# Backends against the reference.


def zipf_stream(seed, num_batches, batch, universe, exponent=1.3, shape=None):
    """Batches of Zipf-distributed ids (a few hot ids, a long tail), scrambled over int64."""
    rng = np.random.default_rng(seed)
    scramble = rng.integers(-(2**63) + 1, 2**63 - 1, size=universe, dtype=np.int64)
    batches = []
    for _ in range(num_batches):
        n = int(rng.integers(0, batch + 1))
        ranks = np.minimum(rng.zipf(exponent, size=n), universe) - 1
        ids = torch.from_numpy(scramble[ranks])
        batches.append(ids.reshape(shape) if shape and n == np.prod(shape) else ids)
    return batches


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("capacity,pending_capacity,min_count", [
    (1, 1, 1), (3, 2, 1), (5, 5, 2), (7, 3, 3), (40, 40, 1), (16, 64, 2),
])
def test_backend_matches_reference_on_zipf_streams(backend_name, capacity, pending_capacity,
                                                   min_count):
    batches = zipf_stream(capacity * 7 + min_count, 30, 37, universe=200)
    run_stream(backend_name, capacity, pending_capacity, min_count, batches)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_backend_matches_reference_on_2d_ids_and_extreme_values(backend_name):
    g = torch.Generator().manual_seed(3)
    extremes = t([-(2**63) + 1, I64_MAX, 0, -1, 1])
    batches = []
    for i in range(25):
        pool = torch.cat([extremes, torch.randint(-50, 50, (20,), generator=g)])
        batches.append(pool[torch.randint(0, 25, (5, 3 + i % 4), generator=g)])  # (B, F)
    batches.insert(7, torch.empty(0, 4, dtype=torch.int64))
    run_stream(backend_name, 6, 4, 2, batches)


@needs_cpu_kernel
def test_cpu_kernel_on_a_long_stream_with_heavy_eviction():
    batches = zipf_stream(11, 60, 3000, universe=5000, exponent=1.1)
    _, vocab = run_stream("cpu", 300, 200, 2, batches)
    assert len(vocab.admitted) == 300 and vocab.clock == 60


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 6),
    pending_capacity=st.integers(1, 6),
    min_count=st.integers(1, 3),
    batches=st.lists(st.lists(st.integers(0, 12), max_size=10), max_size=12),
)
def test_hypothesis_streams(capacity, pending_capacity, min_count, batches):
    for backend_name in CPU_BACKENDS:
        run_stream(backend_name, capacity, pending_capacity, min_count, batches)


# --------------------------------------------------------------------------------------------
# State tensors.


def test_mix64_is_hmoe_data_hashing_mix64():
    values = np.array([0, 1, -1, 2**63 - 1, -(2**63) + 1, 123456789, -987654321], dtype=np.int64)
    values = np.concatenate([values, np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 1000)])
    want = mix64_numpy(values.view(np.uint64)).view(np.int64)
    assert ir.mix64(torch.from_numpy(values)).numpy().tolist() == want.tolist()


def test_new_state_layout_and_bytes():
    state = ir.new_state(5, 3)
    assert state.table.shape == (16, 2) and state.nodes.shape == (10, 4)
    assert state.meta.tolist() == [0, 0, 0, 6, 5, 3]
    assert ir.state_bytes(state) == 16 * 16 + 10 * 32 + 6 * 8
    assert ir.new_state(4).meta.tolist()[4:] == [4, 4]  # pending_capacity defaults to capacity
    assert check_invariants(state) == ir.VocabState(5, 3)


def test_encode_decode_round_trip():
    _, vocab = spec_run(4, 3, 2, [[1, 1, 2, 3], [4, 4, 5, 5, 6], [7, 8, 2], [9, 9, 1]])
    state = ir.encode_state(vocab)
    assert check_invariants(state) == vocab
    target = ir.new_state(4, 3)
    assert ir.encode_state(vocab, out=target) is target and ir.decode_state(target) == vocab
    with pytest.raises(ValueError, match="out has shape"):
        ir.encode_state(vocab, out=ir.new_state(5, 3))


# --------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_bad_input(backend_name):
    state = ir.new_state(4, 2)
    with hmoe.ops.backend(backend_name):
        with pytest.raises(TypeError, match="ids must be int64"):
            ir.id_remap(state, t([1, 2]).int())
        with pytest.raises(ValueError, match="ids must not contain the reserved id"):
            ir.id_remap(state, t([[1, 2], [3, -(2**63)]]))
        with pytest.raises(ValueError, match="min_count must be an integer >= 1"):
            ir.id_remap(state, t([1]), 0)
        wrong = ir.IdRemapState(state.table, ir.new_state(5, 2).nodes, state.meta)
        with pytest.raises(ValueError, match="state.nodes must have C \\+ P \\+ 2 = 8 rows"):
            ir.id_remap(wrong, t([1]))
        wrong = ir.IdRemapState(state.table[:8], state.nodes, state.meta)
        with pytest.raises(ValueError, match="state.table must have 16 slots"):
            ir.id_remap(wrong, t([1]))
        wrong = ir.IdRemapState(state.table, state.nodes.float(), state.meta)
        with pytest.raises(TypeError, match="state.nodes must be an int64 tensor"):
            ir.id_remap(wrong, t([1]))
        wrong = ir.IdRemapState(state.table, state.nodes, state.meta.to("meta"))
        with pytest.raises(ValueError, match="state.meta is on meta but ids is on cpu"):
            ir.id_remap(wrong, t([1]))
        with pytest.raises(ValueError, match="state.meta must have shape"):
            ir.id_remap(ir.IdRemapState(state.table, state.nodes, state.meta[None]), t([1]))
        with pytest.raises(TypeError, match="state must be an IdRemapState"):
            ir.id_remap(tuple(state), t([1]))
    assert state.meta.tolist() == [0, 0, 0, 5, 4, 2]  # nothing was mutated
    for capacity, pending in ((0, 1), (1, 0), (2.5, 1)):
        with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
            ir.new_state(capacity, pending)


@needs_cpu_kernel
def test_compiled_op_checks_its_arguments():
    state = ir.new_state(4, 2)
    op = torch.ops.hmoe.id_remap
    with pytest.raises(ValueError, match="reserved id INT64_MIN"):
        op(*state, t([1, -(2**63)]), 1)
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        op(*state, t([1]), 0)
    with pytest.raises(RuntimeError, match="nodes must have C \\+ P \\+ 2 = 8 rows"):
        op(state.table, ir.new_state(5, 2).nodes, state.meta, t([1]), 1)
    with pytest.raises(RuntimeError, match="table must have a power of two"):
        op(state.table[:8], state.nodes, state.meta, t([1]), 1)
    with pytest.raises(RuntimeError, match="ids must be Long"):
        op(*state, t([1]).int(), 1)
    assert state.meta.tolist() == [0, 0, 0, 5, 4, 2]


@needs_cpu_kernel
def test_opcheck():
    state = ir.new_state(3, 2)
    ir.id_remap(state, t([1, 2, 2, 5]), 1)
    for ids in (t([[1, 9], [9, 7]]), t([]), t([4, 4, 4])):
        torch.library.opcheck(torch.ops.hmoe.id_remap.default, (*state, ids, 2))

"""hmoe.nn.DynamicVocab and HashVocab: the layers around hmoe.ops.id_remap (buffers,
checkpoints, admission, eviction, the hashing trick, compile)."""

import importlib
import io

import numpy as np
import pytest
import torch

import hmoe
from hmoe.data.hashing import mix64 as mix64_numpy
from hmoe.nn import DynamicVocab, HashVocab

ir = importlib.import_module("hmoe.ops.id_remap")
BACKENDS = [b for b in ("reference", "cpu") if hmoe.ops.reasons("id_remap", "cpu")[b] is None]


def t(values):
    return torch.tensor(values, dtype=torch.int64)


def stream(seed, num_batches=40, batch=64, universe=300):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(np.minimum(rng.zipf(1.2, size=batch), universe) * 7919 - 10**6)
            for _ in range(num_batches)]


def test_attributes_and_buffers():
    vocab = DynamicVocab(10, min_count=2, pending_capacity=4)
    assert (vocab.capacity, vocab.min_count, vocab.pending_capacity, vocab.num_rows) == (10, 2, 4, 11)
    assert set(vocab.state_dict()) == {"table", "nodes", "meta"}
    assert vocab.nodes.shape == (16, 4) and vocab.table.shape == (32, 2)
    assert vocab.state_bytes() == 32 * 16 + 16 * 32 + 6 * 8
    assert DynamicVocab(5).pending_capacity == 5
    assert "capacity=10, min_count=2, pending_capacity=4" in repr(vocab)
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        DynamicVocab(0)
    with pytest.raises(ValueError, match="min_count must be an integer >= 1"):
        DynamicVocab(4, min_count=0)
    with pytest.raises(ValueError, match="pending_capacity must be an integer >= 1"):
        DynamicVocab(4, pending_capacity=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_admission_after_min_count(backend_name):
    vocab = DynamicVocab(4, min_count=3)
    with hmoe.ops.backend(backend_name):
        assert vocab(t([11, 12]))[0].tolist() == [0, 0]
        assert vocab(t([11]))[0].tolist() == [0]
        rows, assigned = vocab(t([[12, 11], [13, 12]]))  # 12: sightings 2 and 3, 11: 3
        assert rows.tolist() == [[1, 2], [0, 1]] and assigned.tolist() == [1, 2]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_lru_eviction_order_and_fresh_rows_for_returning_ids(backend_name):
    vocab = DynamicVocab(3)
    with hmoe.ops.backend(backend_name):
        assert vocab(t([1, 2, 3]))[1].tolist() == [1, 2, 3]
        vocab(t([1]))  # LRU order now 2, 3, 1
        rows, assigned = vocab(t([4, 5]))
        assert rows.tolist() == [2, 3] and assigned.tolist() == [2, 3]  # 2 then 3 evicted
        rows, assigned = vocab(t([2]))  # 2 was forgotten: a new admission, evicting 1
        assert rows.tolist() == [1] and assigned.tolist() == [1]
        assert vocab(t([4, 5, 2]))[1].tolist() == []  # all admitted: nothing assigned


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_state_dict_round_trip_mid_stream_continues_identically(backend_name):
    batches = stream(0)
    with hmoe.ops.backend(backend_name):
        whole = DynamicVocab(20, min_count=2, pending_capacity=30)
        expected = [whole(ids) for ids in batches]
        first = DynamicVocab(20, min_count=2, pending_capacity=30)
        for ids in batches[:17]:
            first(ids)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = DynamicVocab(20, min_count=2, pending_capacity=30)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        for ids, (rows, assigned) in zip(batches[17:], expected[17:]):
            got_rows, got_assigned = resumed(ids)
            assert torch.equal(got_rows, rows) and torch.equal(got_assigned, assigned)
    assert sum(a.numel() for _, a in expected[17:]) > 20  # the resumed part evicted plenty


def test_loading_a_vocabulary_of_other_capacities_is_an_error():
    saved = DynamicVocab(6, pending_capacity=4).state_dict()  # C + P = 10, same shapes as (4, 6)
    with pytest.raises(RuntimeError, match="saved vocabulary has capacity 6 and pending_capacity 4"):
        DynamicVocab(4, pending_capacity=6).load_state_dict(saved)


def test_forward_is_the_op_on_its_buffers():
    vocab = DynamicVocab(8, min_count=2, pending_capacity=5)
    spec = ir.VocabState(8, 5)
    for ids in stream(1, num_batches=20, batch=23, universe=40):
        rows, assigned = vocab(ids)
        want_rows, want_assigned = ir.id_remap_ref(spec, ids, 2)
        assert torch.equal(rows, want_rows) and torch.equal(assigned, want_assigned)
    assert ir.decode_state(vocab.state) == spec


def test_hash_vocab_is_one_plus_mix64_mod_buckets():
    values = np.concatenate([np.array([0, 1, -1, 2**63 - 1, -(2**63)], dtype=np.int64),
                             np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 500)])
    for buckets in (1, 7, 1000, 2**31 - 1, 2**61 + 3):
        layer = HashVocab(buckets)
        rows, assigned = layer(torch.from_numpy(values).reshape(5, -1))
        want = 1 + mix64_numpy(values.view(np.uint64)) % np.uint64(buckets)
        assert rows.reshape(-1).tolist() == want.astype(np.int64).tolist()
        assert rows.shape == (5, 101) and assigned.shape == (0,) and assigned.dtype == torch.int64
        assert layer.num_rows == buckets + 1
    assert torch.equal(HashVocab(97)(t([5, -3]).int())[0], HashVocab(97)(t([5, -3]))[0])
    with pytest.raises(ValueError, match="buckets must be an integer"):
        HashVocab(0)
    with pytest.raises(TypeError, match="ids must be an int32 or int64 tensor"):
        HashVocab(5)(torch.ones(3))


def test_layers_feed_an_embedding_table():
    for vocab in (DynamicVocab(16, min_count=1), HashVocab(16)):
        table = torch.nn.Embedding(vocab.num_rows, 4)
        rows, assigned = vocab(t([[3, 99], [2**40, -7]]))
        with torch.no_grad():
            table.weight[assigned] = 0.0  # what a trainer does with the rows given out
        assert table(rows).shape == (2, 2, 4)


@pytest.mark.skipif(hmoe.ops.reasons("id_remap", "cpu")["cpu"] is not None,
                    reason="hmoe._C has no id_remap CPU kernel")
def test_compile_fullgraph():
    eager, compiled = DynamicVocab(6, min_count=2), DynamicVocab(6, min_count=2)
    run = torch.compile(compiled, fullgraph=True)
    for ids in stream(2, num_batches=6, batch=20, universe=30):
        want_rows, want_assigned = eager(ids)
        rows, assigned = run(ids)
        assert torch.equal(rows, want_rows) and torch.equal(assigned, want_assigned)
    assert ir.decode_state(compiled.state) == ir.decode_state(eager.state)

"""hmoe plan: TorchRec's planner on meta-device tables, and what the plan costs."""

from __future__ import annotations

import pytest

from hmoe.cli import main
from hmoe.distributed.plan import (
    CRITEO_1TB_VOCAB_SIZES,
    categorical_schema,
    parse_bytes,
    plan_tables,
)


def test_criteo_1tb_on_64_devices_fits_and_accounts_for_every_row(capsys):
    schema = categorical_schema(CRITEO_1TB_VOCAB_SIZES)
    plan = plan_tables(schema, 4, 16, world_size=64, device_memory=parse_bytes("80GB"),
                       batch_size=65536)
    assert plan.fits() and len(plan.tables) == 26
    rows = sum(CRITEO_1TB_VOCAB_SIZES)
    assert sum(plan.rank_bytes) == rows * (64 * 4 + 4)  # fp32 rows + one accumulator each
    assert all(t["cols"] == 64 and t["ranks"] for t in plan.tables)
    ids, values = 65536 * 26, 65536 * 26 * 64
    assert plan.alltoall_bytes == pytest.approx(63 / 64 * (8 * ids + 2 * 4 * values),
                                                rel=0.05)  # column-wise would send more ids


def test_sequences_count_their_steps_and_data_parallel_all_reduces():
    from hmoe.data.synthetic import SyntheticConfig, generate

    schema = generate(SyntheticConfig(num_rows=50, num_users=20, num_ads=30, max_len=7)).schema
    plan = plan_tables(schema, 2, 8, world_size=2, device_memory=parse_bytes("1GiB"),
                       batch_size=64, sharding="table_wise", optimizer="sgd")
    assert {t["sharding"] for t in plan.tables} == {"table_wise"}
    assert plan.alltoall_bytes > 0 and plan.allreduce_bytes == 0
    replicated = plan_tables(schema, 2, 8, world_size=2, device_memory=parse_bytes("1GiB"),
                             batch_size=64, sharding="data_parallel", optimizer="sgd")
    assert replicated.alltoall_bytes == 0 and replicated.allreduce_bytes > 0
    assert replicated.rank_bytes[0] == replicated.rank_bytes[1] == sum(
        f.vocab_size for f in schema.categorical) * 16 * 4


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="expected a size such as 80GB"):
        parse_bytes("eighty")
    assert parse_bytes("64GiB") == 64 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000
    with pytest.raises(ValueError, match="vocab sizes must be integers >= 1"):
        categorical_schema([5, 0])
    schema = categorical_schema([10**8])
    with pytest.raises(ValueError, match="no sharding of these tables fits 2 x"):
        plan_tables(schema, 4, 16, world_size=2, device_memory=parse_bytes("1GB"),
                    batch_size=64)
    with pytest.raises(ValueError, match="does not split evenly"):
        plan_tables(schema, 4, 16, world_size=3, device_memory=parse_bytes("80GB"),
                    batch_size=64)


def test_the_command_prints_the_plan(capsys):
    assert main(["plan", "--vocab-sizes", "criteo_1tb", "--world-size", "64",
                 "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "t0_C1" in out and "39,884,406" in out and "fits" in out and "all-to-all" in out
    assert main(["plan", "--vocab-sizes", "10,x", "--world-size", "2"]) == 2
    assert "--vocab-sizes: expected integers" in capsys.readouterr().err

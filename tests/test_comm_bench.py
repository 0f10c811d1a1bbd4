"""The communication benchmark counts what the optimizers' sharded steps issue, one CPU process per rank."""

from __future__ import annotations

import pandas as pd
import pytest

from multinorm.bench.comm import count_step, count_steps, formula, model_table, readme_markdown

# uneven row shards at 4 ranks (5 rows: 2 + 2 + 1 + 0, an empty one), and a matrix with fewer rows than ranks
SHAPES = [(8, 6), (8, 6), (5, 7), (6, 8), (3, 4), (9, 5), (2, 3)]


FORMULA_CASES = [("sinkgd", "fsdp"), ("mngd", "fsdp"), ("swan", "fsdp"), ("swan", "ddp"), ("adamw", "fsdp"),
                 ("sinkgd", "ddp")]
GROWTH = [1, 3, 7]


@pytest.fixture(scope="module")
def counted_at_4_ranks() -> dict:
    """Every job of this module at 4 ranks, counted by one set of 4 rank processes."""
    jobs = {("formula", name, layout): (name, layout, SHAPES) for name, layout in FORMULA_CASES}
    jobs |= {("growth", count): ("sinkgd", "fsdp", SHAPES[:count]) for count in GROWTH}
    return dict(zip(jobs, count_steps(list(jobs.values()), world=4)))


@pytest.mark.parametrize("count", GROWTH)
def test_sinkgd_step_at_4_ranks_issues_at_most_l_plus_3_collectives(count, counted_at_4_ranks):
    """SinkGD with L = 5 on Shard(0) matrices: the number of collectives does not grow with the matrices."""
    counted = counted_at_4_ranks["growth", count]
    assert set(counted) == {"all_reduce"}
    assert 0 < counted["all_reduce"][0] <= 5 + 3


@pytest.mark.parametrize("name,layout", FORMULA_CASES)
def test_counted_calls_and_bytes_equal_the_formula(name, layout, counted_at_4_ranks):
    """The collectives and payloads counted on 4 rank processes equal the closed form (busiest rank)."""
    counted = counted_at_4_ranks["formula", name, layout]
    assert counted == formula(name, layout, SHAPES, world=4)
    if name == "sinkgd" and layout == "fsdp":  # L + 2 all-reduces: maxima, totals, L column sums
        assert counted == {"all_reduce": (7, 4 * (2 * len(SHAPES) + 5 * sum(n for _, n in SHAPES)))}
    if name == "adamw" or layout == "ddp" and name != "swan":
        assert counted == {}


def test_swan_all_to_all_payload_is_the_busiest_ranks():
    """Under FSDP2 SWAN's two all-to-alls carry, on the busiest rank, the larger of its shards and the
    matrices it owns; under DDP the all-gather brings world x the largest owned share."""
    shapes = [(8, 8), (4, 4)]  # at 2 ranks: rank 0 owns the 8 x 8 (64 entries), rank 1 the 4 x 4
    assert formula("swan", "fsdp", shapes, 2) == {"all_to_all_single": (2, 2 * 4 * 64)}
    assert formula("swan", "ddp", shapes, 2) == {"all_gather": (1, 4 * 2 * 64)}
    assert count_step("swan", "fsdp", shapes, 2) == formula("swan", "fsdp", shapes, 2)


def test_model_and_readme_tables_follow_the_counts():
    comm = pd.DataFrame([dict(setting="block-1b", layout="fsdp", world_size=8, optimizer=o, collective=c, calls=k,
                              bytes_per_rank=b, counted_at_shrink=1)
                         for o, c, k, b in [("adamw", "none", 0, 0), ("sinkgd", "all_reduce", 7, 2 * 10**8)]])
    model = model_table(comm, setting="block-1b")
    sink = model.set_index("optimizer").loc["sinkgd"]
    # 7 x 10 us + 2e8 B x 2 (7/8) / 200 GB/s = 0.07 ms + 1.75 ms
    assert sink.overhead_ms == pytest.approx(0.07 + 1.75)
    assert model.set_index("optimizer").loc["adamw"].overhead_ms == 0
    text = readme_markdown(comm.assign(setting="hidden-1b"), model)
    assert "| fsdp | sinkgd | 7 | 1.82 |" in text

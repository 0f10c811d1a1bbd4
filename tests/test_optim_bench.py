"""multinorm.bench: measurement primitives, floors, targets, and a quick end-to-end run."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import torch

from multinorm import bench
from multinorm.bench.targets import bandwidth_bound, evaluate_targets, summary_markdown
from multinorm.studies.convergence import optimizer_ceiling

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------------
# measurement primitives


def test_peak_extra_bytes_sees_transient_buffers_only():
    x = torch.randn(256, 256)

    def two_live_buffers():
        a = x * 2
        b = a + 1  # a and b alive together: 2 x 256 KiB
        del a
        return b.sum()

    peak, method = bench.peak_extra_bytes(two_live_buffers, [x], torch.device("cpu"))
    assert "function mode" in method
    assert 2 * 256 * 256 * 4 <= peak < 2 * 256 * 256 * 4 + 1024
    peak, _ = bench.peak_extra_bytes(lambda: x.mul_(1.0), [x], torch.device("cpu"))  # in place: nothing new
    assert peak == 0


def test_host_sync_counter_counts_item_and_bool():
    x = torch.randn(8)

    def syncs_twice():
        value = x.sum().item()
        if x.max() > value:  # bool(tensor)
            pass

    assert bench.count_host_syncs(syncs_twice) == 2
    assert bench.count_host_syncs(lambda: torch.where(x > 0, x, x.mean()).mul_(2)) == 0
    with bench.HostSyncCounter() as counter:
        float(x[0])
        int(x.argmax())
    assert counter.count == 2


def test_interleave_alternates_the_callables_round_by_round():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.interleave(fns, rounds=3, min_run_time=1e-4)
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # collapse repeats
    assert runs == ["a", "b"] * 3
    assert list(times.columns) == ["round", "name", "seconds", "calls"]
    assert times.groupby("round")["name"].apply(list).tolist() == [["a", "b"]] * 3
    assert (times["seconds"] > 0).all() and (times["calls"] >= 1).all()


def test_ratio_summary_takes_ratios_within_rounds():
    # B is twice A in rounds 0 and 2 and four times A in round 1, while the machine slows down 10x;
    # the ratio of medians over all times would be 2.5 instead
    times = pd.DataFrame({"round": [0, 0, 1, 1, 2, 2], "name": ["a", "b"] * 3,
                          "seconds": [1.0, 2.0, 10.0, 40.0, 100.0, 200.0]})
    assert bench.ratio_summary(times, "b", "a") == {"ratio": 2.0, "ratio_min": 2.0, "ratio_max": 4.0}
    assert bench.ratio_summary(times, "a", "b", scale=4.0)["ratio"] == 2.0


# ------------------------------------------------------------------------------------------------------------
# floors


def test_swan_flops_counts_gram_newton_schulz_and_product():
    # s = 2, l = 3: Gram 2*4*3 + product 2*4*3 + 1 step of three 2x2x2 products 6*8
    assert bench.swan_flops([(2, 3)], ns_steps=1) == 24 + 24 + 48
    assert bench.swan_flops([(3, 2)], ns_steps=1) == bench.swan_flops([(2, 3)], ns_steps=1)
    assert bench.swan_flops([(2, 3), (4, 4)], ns_steps=0) == 48 + 4 * 16 * 4


def test_traffic_counts_the_passes_of_each_method():
    p32 = torch.nn.Parameter(torch.zeros(10, 10))
    p32.grad = torch.zeros(10, 10)
    pbf = torch.nn.Parameter(torch.zeros(10, 10, dtype=torch.bfloat16))
    pbf.grad = torch.zeros(10, 10, dtype=torch.bfloat16)
    assert bench.traffic("adamw-foreach", [p32])[0] == 7 * 4 * 100
    assert bench.traffic("adamw-fused", [p32, pbf])[0] == 7 * 4 * 100 + 7 * 2 * 100
    assert bench.traffic("sgd", [p32])[0] == 3 * 4 * 100
    # L = 5: one grad read per Sinkhorn iteration (the prescale comes from the first); grad r + param r/w
    assert bench.traffic("sinkgd", [p32])[0] == (5 * 4 + 4 + 8) * 100
    assert bench.traffic("sinkgd", [pbf])[0] == (5 * 2 + 2 + 4) * 100
    assert "5 grad reads" in bench.traffic("sinkgd", [p32])[1]
    assert bench.traffic("sinkgd", [p32]).read_only == 5 * 4 * 100 and bench.traffic("sgd", [p32]).read_only == 0
    assert bench.traffic("swan", [p32]) is None


def test_traffic_counts_the_rereads_a_cache_could_serve():
    """Of a gradient that fits in the cache, SinkGD's reads after the first are cacheable; of a larger one, none."""
    small, large = (torch.nn.Parameter(torch.zeros(shape)) for shape in ((10, 10), (20, 20)))
    small.grad, large.grad = torch.zeros(10, 10), torch.zeros(20, 20)
    moved = bench.traffic("sinkgd", [small, large], cache_bytes=400)  # small: 400 bytes; large: 1,600
    assert moved.cacheable == 4 * 400 and moved.bytes == (5 * 4 + 12) * 500 and moved.read_only == 5 * 4 * 500
    rest = moved.from_memory()
    assert (rest.bytes, rest.read_only, rest.cacheable) == (moved.bytes - 1600, moved.read_only - 1600, 0)
    assert bench.traffic("sinkgd", [small], cache_bytes=399).cacheable == 0
    assert bench.traffic("sinkgd", [small]).cacheable == 0  # no cache size known
    assert bench.traffic("adamw-fused", [small], cache_bytes=10**9).cacheable == 0  # one pass: nothing re-read


def test_cache_sizes_are_read_as_sysfs_writes_them():
    from multinorm.bench.measure import _cache_size

    assert _cache_size("32768K\n") == 32 * 2**20 and _cache_size("1M") == 2**20 and _cache_size("512") == 512


def test_bandwidth_floor_counts_read_only_passes_at_the_read_rate():
    machine = {"read": 10e9, "copy": 12e9, "axpy": 20e9}
    sinkgd = bench.Traffic(bytes=800, accounting="", read_only=500)
    seconds, stream = bench.bandwidth_floor(sinkgd, machine)
    assert seconds == pytest.approx(500 / 10e9 + 300 / 20e9)
    assert stream == "read (read-only passes), axpy (the rest)"
    assert bench.bandwidth_floor(bench.Traffic(700, ""), machine) == (pytest.approx(700 / 20e9), "axpy")
    # a machine measured without the read stream: everything at the best one
    assert bench.bandwidth_floor(sinkgd, {"axpy": 20e9})[0] == pytest.approx(800 / 20e9)


def test_slow_methods_are_skipped_or_timed_by_one_step(monkeypatch):
    from multinorm.bench import steps

    args = bench.parse_args(["--quick", "--max-step", "0"])
    cpu, fp32 = torch.device("cpu"), torch.float32

    def run():
        return steps.bench_setting("block-1b", cpu, fp32, ["adamw-fused", "sgd", "swan"], args, None,
                                   lambda msg: None)

    out = run()
    skipped = {r["method"]: r for r in out["optimizer_step"]}["sgd"]  # any predicted time is over 10 x 0 s
    assert skipped["note"].startswith("skipped") and "step_ms" not in skipped and not out["compute_floor"]
    monkeypatch.setattr(steps, "predicted_step", lambda *a: 0.0)
    out = run()
    found = {r["method"]: r for r in out["optimizer_step"]}
    [floor] = out["compute_floor"]
    assert floor["method"] == "swan" and floor["rounds"] == 1 and floor["ratio"] > 0
    one_step = found["sgd"]  # its warm-up step took over 0 s
    assert one_step["rounds"] == 1 and one_step["step_ms"] > 0 and one_step["ratio"] > 0
    assert "warm-up step" in one_step["note"] and one_step["peak_extra_bytes"] is None
    assert found["adamw-fused"]["rounds"] == args.rounds  # the reference is always timed in rounds


def test_train_throughput_reports_the_optimizer_phase_per_round():
    """Two fake training steps of ~2 ms whose optimizer phases are 1 ms (baseline) and 0.25 ms: the phase ratio
    is theirs exactly, and the tokens/s ratio comes with an interval around its rounds."""
    from multinorm.bench.training import Loop, TrainSetup, train_throughput

    def loop(name: str, phase_s: float) -> Loop:
        made = Loop(name, lambda: None, lambda: None)

        def step():
            start = time.perf_counter()
            while time.perf_counter() - start < 2e-3:
                pass
            made.optimizer_seconds.append(phase_s)

        made.step = step
        return made

    loops = [loop("adamw", 1e-3), loop("sinkgd", 2.5e-4)]
    rows, times = train_throughput(loops, TrainSetup(batch_size=2, seq_len=8), torch.device("cpu"), torch.float32,
                                   rounds=3, min_run_time=0.01)
    found = {r["optimizer"]: r for r in rows}
    assert found["adamw"]["optimizer_ratio"] == 1.0 and found["sinkgd"]["optimizer_ratio"] == pytest.approx(0.25)
    assert found["sinkgd"]["optimizer_ms"] == pytest.approx(0.25)
    sink = found["sinkgd"]
    assert 0 < sink["ratio_low"] <= sink["ratio_high"] and 0.5 < sink["ratio"] < 2.0
    assert sorted(times["round"].unique()) == [0, 1, 2] and len(times) == 6
    assert times.loc[times["name"] == "sinkgd", "optimizer_seconds"].tolist() == pytest.approx([2.5e-4] * 3)


# ------------------------------------------------------------------------------------------------------------
# targets


def _tables(sink_ratio=1.1, micro_ratio=1.3, syncs=(0, 0), floor=(1.1, None), tokens_ratio=1.02, phase_ratio=0.8,
            ratio_high=1.05, fraction=0.9):
    cpu = {"device": "cpu", "dtype": "float32", "threading": "1 thread", "baseline": "adamw-fused"}
    step = pd.DataFrame([
        {"setting": "block-1b", **cpu, "method": "sinkgd", "ratio": sink_ratio, "host_syncs": syncs[0]},
        {"setting": "micro", **cpu, "method": "sinkgd", "ratio": micro_ratio, "host_syncs": syncs[1]},
        {"setting": "micro", **cpu, "method": "swan", "ratio": 30.0, "host_syncs": 5},
        {"setting": "block-1b", **cpu, "threading": "all cores", "method": "sinkgd", "ratio": 1.15, "host_syncs": 0},
        {"setting": "block-1b", "device": "cuda", "dtype": "bfloat16", "method": "sinkgd",
         "baseline": "adamw-fused", "ratio": float("nan"), "host_syncs": None},
    ])
    floors = pd.DataFrame([{"setting": s, "device": "cpu", "dtype": "float32", "method": "swan", "ratio": r}
                           for s, r in zip(("micro", "block-1b"), floor) if r is not None])
    train = pd.DataFrame([{"model": "nano", "device": "cpu", "dtype": "float32", "threads": 1,
                           "threading": "1 thread", "optimizer": "sinkgd", "baseline": "adamw",
                           "baseline_built": "AdamW (fused): hidden, rest", "tokens_per_s": 5000.0,
                           "ratio": tokens_ratio, "ratio_min": 0.9, "ratio_max": 1.1, "ratio_low": 0.95,
                           "ratio_high": ratio_high, "optimizer_ms": 8.0, "optimizer_ratio": phase_ratio}])
    bandwidth = pd.DataFrame([{"setting": "block-1b", "device": "cpu", "dtype": "float32", "threading": "1 thread",
                               "method": "sinkgd", "bytes": 1.6e9, "step_ms": 100.0, "floor_ms": 100.0 * fraction,
                               "achieved_gbs": 16.0, "machine_gbs": 16.0 / fraction, "fraction": fraction}])
    return {"optimizer_step": step, "compute_floor": floors, "train_throughput": train, "bandwidth": bandwidth}


def test_targets_status_from_synthetic_tables():
    """Each target reads its own rows: setting, thread count, fused-AdamW baseline; a row not there is "not
    measured" (the micro and all-cores rows left out of the synthetic tables)."""
    targets = evaluate_targets(_tables())
    assert list(targets.columns) == ["target", "measured", "threshold", "floor", "status"]
    assert len(targets) == len(bench.TARGETS) == 15
    status = dict(zip(targets["target"], targets["status"]))
    measured = dict(zip(targets["target"], targets["measured"]))
    names = [t.name for t in bench.TARGETS]
    assert [status[n] for n in names] == [
        "met", "not met", "met", "not measured",  # step ratios: 1 thread (block, micro), all cores (block, micro)
        "met", "not measured", "not measured", "not measured",  # bandwidth shares, same order
        "met", "not measured",  # SWAN's compute floor (micro, block)
        "met", "not measured", "met",  # optimizer phase (1 thread, all cores), tokens/s interval
        "met", "not measured"]  # host syncs, GPU
    assert measured[names[0]] == 1.1 and measured[names[2]] == 1.15 and measured[names[4]] == 0.9
    assert math.isnan(measured[names[9]])
    assert targets["threshold"].tolist()[:5] == ["<= 1.2"] * 4 + [">= 0.85"]
    assert all("AdamW(fused)" in n for n in names[:4]) and names[2].endswith("all cores")


def test_targets_edges_and_worst_sync_count():
    names = [t.name for t in bench.TARGETS]
    tables = _tables(sink_ratio=1.2, phase_ratio=1.01, ratio_high=0.99, tokens_ratio=1.2, syncs=(0, 3),
                     fraction=0.84)
    status = dict(zip(names, evaluate_targets(tables)["status"]))
    assert status[names[0]] == "met"  # the threshold itself meets "<="
    assert status[names[4]] == "not met"  # a bandwidth share below 0.85
    assert status[names[10]] == "not met"  # the optimizer phase, not the tokens/s point estimate, decides
    assert status[names[12]] == "not met"  # an interval wholly below 1: training measurably slower
    assert status[names[13]] == "not met"  # the largest count over the settings decides
    assert evaluate_targets(_tables(ratio_high=1.0))["status"][12] == "met"
    foreach = _tables()
    foreach["train_throughput"] = foreach["train_throughput"].assign(baseline_built="AdamW (foreach): hidden, rest")
    assert evaluate_targets(foreach)["status"][10] == "not measured"  # measured against the slower AdamW
    empty = evaluate_targets({})
    assert (empty["status"] == "not measured").all()


def test_summary_markdown_lists_targets_and_profile():
    profile = pd.DataFrame([{"model": "nano", "device": "cpu", "dtype": "float32", "batch_size": 8, "seq_len": 256,
                             "optimizer": opt, "phase": phase, "ms_per_step": ms, "fraction": ms / 100}
                            for opt in ("adamw", "sinkgd") for phase, ms in (("forward", 60.0), ("backward", 40.0))])
    tables = _tables() | {"train_profile": profile}
    text = summary_markdown(tables, evaluate_targets(tables), {"cpu": "Test CPU", "quick": True})
    assert "Test CPU" in text and "Quick run" in text
    assert "| backward | 40.0 ms (40%) | 40.0 ms (40%) |" in text
    assert text.count("not measured") == 7
    assert ("cpu float32, 1 thread sinkgd 5,000 (1.020x adamw, 0.900-1.100 [0.950, 1.050]; optimizer 8.0 ms, 0.80x "
            "adamw's)") in text


def test_optimizer_ceiling_bounds_the_training_ratio_by_the_optimizer_phase():
    """AdamW: 90 ms of work + 10 ms optimizer; SinkGD's optimizer 4 ms: a free step gives 100/90, SinkGD's 100/94."""
    phases = {"adamw": (("forward", 30.0), ("backward", 60.0), ("optimizer", 10.0)),
              "sinkgd": (("forward", 31.0), ("backward", 62.0), ("optimizer", 4.0))}
    profile = pd.DataFrame([{"model": "nano", "device": "cpu", "dtype": "float32", "batch_size": 8, "seq_len": 256,
                             "optimizer": opt, "phase": phase, "ms_per_step": ms, "fraction": ms / 100}
                            for opt, rows in phases.items() for phase, ms in rows])
    row = optimizer_ceiling(profile).iloc[0]
    assert row["ceiling"] == pytest.approx(100 / 90) and row["predicted"] == pytest.approx(100 / 94)
    assert optimizer_ceiling(profile, method="swan").empty
    tables = _tables(tokens_ratio=0.98) | {"train_profile": profile}
    text = summary_markdown(tables, evaluate_targets(tables), {})
    assert "at most 1.111x" in text and "predicts 1.064x" in text and "0.980x (0.900-1.100 over rounds)" in text
    assert "What the optimizer allows" not in summary_markdown(_tables(), evaluate_targets(_tables()), {})


def test_bandwidth_bound_divides_sinkgds_floor_by_the_adamw_fused_step():
    rows = [("block-1b", "adamw-fused", 400.0, 90.0), ("block-1b", "adamw-foreach", 900.0, 90.0),
            ("block-1b", "sinkgd", 340.0, 190.0), ("micro", "adamw-fused", 20.0, 5.0), ("micro", "sinkgd", 24.0, 12.0), ("micro", "sgd", 3.0, 2.0),
            ("small", "sinkgd", 1.0, 0.5)]  # no AdamW row: no bound
    bandwidth = pd.DataFrame([{"setting": s, "device": "cpu", "dtype": "float32", "method": m, "step_ms": t,
                               "floor_ms": f} for s, m, t, f in rows])
    bound = bandwidth_bound(bandwidth).set_index("setting")["floor_ratio"]
    assert bound.to_dict() == pytest.approx({"block-1b": 190 / 400, "micro": 12 / 20})
    shown = bandwidth.assign(bytes=1e6, achieved_gbs=1.0, machine_gbs=2.0, fraction=0.5)
    text = summary_markdown(_tables() | {"bandwidth": shown}, evaluate_targets(_tables()), {})
    assert "block-1b cpu float32: 0.47; micro cpu float32: 0.60" in text
    # rows at two thread counts: one bound each, said with its threads
    both = pd.concat([bandwidth.assign(threads=1), bandwidth.assign(threads=2, step_ms=bandwidth["step_ms"] / 2)])
    bound = bandwidth_bound(both).set_index(["setting", "threads"])["floor_ratio"]
    assert bound.to_dict() == pytest.approx({("block-1b", 1): 190 / 400, ("block-1b", 2): 190 / 200,
                                             ("micro", 1): 12 / 20, ("micro", 2): 12 / 10})
    shown = both.assign(bytes=1e6, achieved_gbs=1.0, machine_gbs=2.0, fraction=0.5)
    text = summary_markdown(_tables() | {"bandwidth": shown}, evaluate_targets(_tables()), {})
    assert "block-1b cpu float32, 1 thread: 0.47; micro cpu float32, 1 thread: 0.60; block-1b cpu float32, 2 threads: 0.95" in text


def test_step_targets_beyond_the_bound_are_out_of_reach():
    """A step ratio that misses its threshold is "out of reach here" when SinkGD's bound (bound_ms, the cacheable
    re-reads left out; floor_ms where a row has none) over AdamW(fused)'s step misses it too, else "not met"."""
    names = [t.name for t in bench.TARGETS]

    def bandwidth(block_bound, micro_bound):
        rows = [("block-1b", "adamw-fused", 40.0, 50.0, None), ("block-1b", "sinkgd", 80.0, 77.0, block_bound),
                ("micro", "adamw-fused", 3.0, 3.0, None), ("micro", "sinkgd", 6.0, 5.0, micro_bound)]
        return pd.DataFrame([{"setting": s, "device": "cpu", "dtype": "float32", "threads": 1, "method": m,
                              "step_ms": t, "floor_ms": f, "bound_ms": b, "fraction": 0.9, "bytes": 1e6,
                              "achieved_gbs": 1.0, "machine_gbs": 2.0} for s, m, t, f, b in rows])

    tables = _tables(sink_ratio=2.0, micro_ratio=2.0)
    tables["optimizer_step"] = tables["optimizer_step"].assign(threads=1)
    found = evaluate_targets(tables | {"bandwidth": bandwidth(56.0, 2.0)}).set_index("target")
    assert found.loc[names[0], "status"] == "out of reach here" and found.loc[names[0], "floor"] == pytest.approx(1.4)
    assert found.loc[names[1], "status"] == "not met" and found.loc[names[1], "floor"] == pytest.approx(2 / 3)
    # without bound_ms the floor decides; a bound at the threshold is within reach
    found = evaluate_targets(tables | {"bandwidth": bandwidth(48.0, None)}).set_index("target")
    assert found.loc[names[0], "status"] == "not met" and found.loc[names[0], "floor"] == pytest.approx(1.2)
    assert found.loc[names[1], "status"] == "out of reach here" and found.loc[names[1], "floor"] == pytest.approx(5 / 3)
    # a met target stays met; targets with no floor (bandwidth share, phase) carry none
    met = evaluate_targets(_tables(sink_ratio=1.0) | {"bandwidth": bandwidth(56.0, 2.0)}).set_index("target")
    assert met.loc[names[0], "status"] == "met"
    assert met["floor"].iloc[4:].isna().all()
    text = summary_markdown(tables | {"bandwidth": bandwidth(56.0, 2.0)}, evaluate_targets(tables | {"bandwidth": bandwidth(56.0, 2.0)}),
                            {"last_level_cache_bytes": 32 * 2**20})
    assert "| out of reach here |" in text and "(32 MiB here)" in text and "block-1b cpu float32, 1 thread: 1.40" in text


# ------------------------------------------------------------------------------------------------------------
# command line


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--settings", "block-2b"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "adamw,lion"])
    with pytest.raises(SystemExit, match="no benchmark tables"):
        bench.main(["--targets-only", "--out", str(tmp_path)])


def test_quick_run_writes_every_table(tmp_path, capsys):
    targets = bench.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "targets (quick run" in out
    expected = {
        "optimizer_step": {"setting", "device", "dtype", "threads", "method", "baseline", "rounds", "step_ms",
                           "ratio", "ratio_min", "ratio_max", "state_bytes", "peak_extra_bytes", "host_syncs"},
        "compute_floor": {"setting", "method", "gflop", "matmul_n", "matmul_gflops", "floor_ms", "step_ms", "ratio",
                          "ratio_min", "ratio_max"},
        "bandwidth": {"setting", "method", "accounting", "bytes", "step_ms", "achieved_gbs", "machine_gbs",
                      "fraction", "floor_ms"},
        "train_throughput": {"model", "optimizer", "batch_size", "seq_len", "tokens_per_s", "ratio", "ratio_min",
                             "ratio_max", "ratio_low", "ratio_high", "optimizer_ms", "optimizer_ratio"},
        "train_profile": {"optimizer", "phase", "ms_per_step", "fraction"},
        "raw_times": {"table", "comparison", "round", "name", "seconds"},
        "targets": {"target", "measured", "threshold", "status"},
    }
    tables = {name: pd.read_csv(tmp_path / f"{name}.csv") for name in expected}
    for name, columns in expected.items():
        assert columns <= set(tables[name].columns), name
        assert len(tables[name]) > 0, name

    step = tables["optimizer_step"]
    cpu = step[step["device"] == "cpu"]
    assert set(cpu["setting"]) == {"block-1b", "micro"}
    assert {"adamw-fused", "adamw-foreach", "sinkgd", "swan"} <= set(cpu["method"])
    assert (cpu["baseline"] == "adamw-fused").all()
    one = cpu[cpu["threads"] == 1]  # (the all-cores pass below shares the cores with the test's other workers)
    assert (one["ratio_min"] <= one["ratio"]).all() and (one["ratio"] <= one["ratio_max"]).all()
    assert (cpu.loc[cpu["method"] == "adamw-fused", "ratio"] == 1).all()
    assert (cpu.loc[cpu["method"] == "sinkgd", "state_bytes"] == 0).all()
    # a row is measured, or says why not (a busy machine can push a method's predicted step over the limit)
    assert ((cpu["host_syncs"] >= 0) | cpu["note"].fillna("").str.startswith("skipped")).all()
    assert (cpu[cpu["threads"] == 1]["host_syncs"] >= 0).all()
    if not torch.cuda.is_available():
        assert (step.loc[step["device"] == "cuda", "note"] == "not measured: no CUDA device").all()
    assert set(tables["compute_floor"]["method"]) == {"swan"}
    assert {"adamw-fused", "adamw-foreach", "sgd", "sinkgd"} <= set(tables["bandwidth"]["method"])
    assert set(tables["train_throughput"]["optimizer"]) >= {"adamw", "sinkgd"}
    assert (tables["train_throughput"]["baseline_built"] == "AdamW (fused): hidden, rest").all()
    from multinorm.bench.measure import available_cores

    if available_cores() > 1:  # a second pass with every core: the reference and SinkGD's steps, and training
        wide = cpu[cpu["threading"] == "all cores"]
        assert set(wide["method"]) == {"adamw-fused", "adamw-foreach", "sinkgd", "sinkgd-torch"}
        assert ((wide["step_ms"] > 0) | wide["note"].notna()).all()
        assert (wide["threads"] == available_cores()).all() and (cpu[cpu["threads"] == 1]["threading"] == "1 thread").all()
        assert set(tables["train_throughput"]["threading"]) == {"1 thread", "all cores"}
    for _, frame in tables["train_profile"].groupby(["optimizer", "threads"]):
        assert set(frame["phase"]) == {"data", "forward", "backward", "optimizer", "evaluation", "other"}
        assert frame["fraction"].sum() == pytest.approx(1.0, abs=1e-4)  # the CSV keeps 6 digits
    assert len(targets) == len(bench.TARGETS) and set(targets["status"]) <= {"met", "not met", "out of reach here", "not measured"}
    if not torch.cuda.is_available():
        assert targets["status"].iloc[-1] == "not measured"
    assert (tmp_path / "environment.json").exists() and "Targets" in (tmp_path / "readme_bench.md").read_text()
    env = json.loads((tmp_path / "environment.json").read_text())
    assert set(env["measured"]) == {"optimizer steps", "training"}  # --quick skips the runs-at-once part
    assert env["measured_commits"] == {"optimizer steps": env["git_commit"], "training": env["git_commit"]}
    assert f"Measured (optimizer steps {env['date'][:10]}; training {env['date'][:10]})" in (
        tmp_path / "readme_bench.md").read_text()

    again = bench.main(["--targets-only", "--out", str(tmp_path)])
    assert again["status"].tolist() == targets["status"].tolist()

    # --methods times only those (and the reference): the other methods' rows are kept as they were, in place
    bench.main(["--quick", "--out", str(tmp_path), "--methods", "sgd", "--settings", "micro", "--skip-train"])
    partial = pd.read_csv(tmp_path / "optimizer_step.csv")
    assert partial[["setting", "device", "dtype", "method"]].equals(step[["setting", "device", "dtype", "method"]])
    kept = (partial.setting == "block-1b") | ~partial.method.isin(["sgd", "adamw-fused"])
    pd.testing.assert_frame_equal(partial[kept], step[kept])
    assert not partial[~kept].equals(step[~kept])  # sgd and the reference on micro were timed again
    # a table that nothing timed now adds to (SWAN's compute floor) is kept, not emptied
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "compute_floor.csv"), tables["compute_floor"])
    raw = pd.read_csv(tmp_path / "raw_times.csv")
    assert set(raw[raw.table == "optimizer_step"].comparison) == set(tables["raw_times"].query(
        "table == 'optimizer_step'").comparison)
    assert set(json.loads((tmp_path / "environment.json").read_text())["measured"]) == {
        "optimizer steps", "training", "optimizer steps (sgd)"}


def test_a_full_steps_run_supersedes_the_partial_ones():
    from multinorm.bench.cli import measured_parts

    previous = {"date": "d1", "git_commit": "c1",
                "measured": {"optimizer steps": "d0", "optimizer steps (sgd)": "d1", "training": "d0"},
                "measured_commits": {"optimizer steps": "c0", "training": "c0"}}
    measured, commits = measured_parts(previous, ["optimizer steps (swan)"], "d2", "c2")
    assert measured == {"optimizer steps": "d0", "optimizer steps (sgd)": "d1", "optimizer steps (swan)": "d2",
                        "training": "d0"}
    assert commits == {"optimizer steps": "c0", "optimizer steps (sgd)": "c1", "optimizer steps (swan)": "c2",
                       "training": "c0"}
    measured, commits = measured_parts(previous, ["optimizer steps"], "d2", "c2")
    assert measured == {"optimizer steps": "d2", "training": "d0"}
    assert commits == {"optimizer steps": "c2", "training": "c0"}


# ------------------------------------------------------------------------------------------------------------
# runs at once (make figures JOBS=N)


def test_job_counts_divide_the_cores():
    from multinorm.bench.jobs import job_counts

    assert job_counts(1) == [1] and job_counts(2) == [1, 2] and job_counts(12) == [1, 2, 3, 4, 6, 12]


def test_jobs_probe_sums_the_rates_of_runs_started_together(monkeypatch, data_cache_root):
    """The probe's plumbing with threads standing in for processes (same Barrier/Queue/Process interface):
    every worker count that divides the cores, each worker timing its own steps after the common start."""
    import queue
    import threading
    from types import SimpleNamespace

    from multinorm.bench import jobs
    from multinorm.bench.training import TrainSetup

    threads_seen = []
    real = jobs.run_steps
    monkeypatch.setattr(jobs, "run_steps", lambda setup, threads, *a, **k: threads_seen.append(threads)
                        or real(setup, 1, *a, **k))
    monkeypatch.setattr(jobs, "get_context", lambda method: SimpleNamespace(
        Barrier=threading.Barrier, Queue=queue.Queue, Process=threading.Thread))
    setup = TrainSetup(batch_size=2, seq_len=32, eval_tokens=32 * 8)
    rows = jobs.jobs_throughput(setup, steps=2, data_dir=str(data_cache_root), cores=2, log=lambda msg: None)
    assert sorted(threads_seen) == [1, 1, 2]  # JOBS=1 with 2 threads, JOBS=2 with one each
    assert [(r["jobs"], r["threads_per_run"]) for r in rows] == [(1, 2), (2, 1)]
    assert rows[0]["ratio"] == 1 and rows[1]["ratio"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert rows[1]["tokens_per_s_min_run"] <= rows[1]["tokens_per_s"] / 2 <= rows[1]["tokens_per_s_max_run"]
    text = summary_markdown({"jobs_throughput": pd.DataFrame(rows)}, pd.DataFrame(
        columns=["target", "measured", "threshold", "status"]), {})
    assert "JOBS=1 (2 thread(s) each)" in text and "JOBS=2 (1 thread(s) each)" in text and "Fastest here: JOBS=" in text

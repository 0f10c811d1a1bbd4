"""The performance targets, evaluated from the benchmark's CSV tables, and the README summary.

Targets are reported, never enforced: a target that is not met, or not measured on this machine (e.g.
the GPU row without CUDA), is a line in ``targets.csv``, not a failed run.

The reference AdamW is torch's fused kernel, in the step rows and in training (where ``build_optimizer``
picks it). Training speed at ``nano`` on CPU is judged by two rows: the optimizer phase of a training step
(the only part of it an optimizer changes) must take less time than AdamW's, and the 95 % interval of the tokens/s
ratio must reach 1 (training not measurably slower). Whether the ratio's point estimate lands above 1 is not
a target: forward, backward and evaluation are ~99 % of that step, so even a free optimizer step moves the
ratio by about 1 % (:func:`multinorm.studies.convergence.optimizer_ceiling`), less than the noise between rounds, which would decide it.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..studies.convergence import optimizer_ceiling

__all__ = ["Target", "TARGETS", "TABLES", "bandwidth_bound", "evaluate_targets", "optimizer_ceiling", "read_tables",
           "summary_markdown"]

# file stem -> what it holds (every table the targets or the summary read)
TABLES = ("optimizer_step", "compute_floor", "bandwidth", "train_throughput", "train_profile", "jobs_throughput")
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


@dataclass(frozen=True)
class Target:
    """``column`` of the rows of ``table`` matching ``where``, compared with ``threshold`` by ``op``.
    ``reduce`` picks the value among several matching rows ("first" or "max"). ``floored``: the value cannot
    go below :func:`bandwidth_bound`'s ``floor_ratio`` of the matched row's setting and thread count."""

    name: str
    table: str
    where: Mapping[str, object]
    column: str
    op: str
    threshold: float
    reduce: str = "first"
    floored: bool = False  # a SinkGD / AdamW(fused) step ratio: its best possible value is bandwidth_bound's


_CPU = {"device": "cpu", "dtype": "float32"}
# against torch's fused AdamW (rows measured before the trainer used it carry no baseline_built: not measured)
_NANO_SINKGD = {"model": "nano", "device": "cpu", "optimizer": "sinkgd", "baseline": "adamw",
                "baseline_built": "AdamW (fused): hidden, rest"}
_SETTINGS = {"block-1b": "1b block", "micro": "micro hidden matrices"}
_THREADINGS = ("1 thread", "all cores")  # the benchmark's default and a training run's default
TARGETS = (
    *(Target(f"SinkGD step / AdamW(fused) step, {label}, CPU fp32, {threading}", "optimizer_step",
             {"setting": setting, **_CPU, "threading": threading, "method": "sinkgd", "baseline": "adamw-fused"},
             "ratio", "<=", 1.2, floored=True)
      for threading in _THREADINGS for setting, label in _SETTINGS.items()),
    *(Target(f"SinkGD step's share of the machine's memory bandwidth (its reads at the read rate), {label}, CPU fp32, {threading}", "bandwidth",
             {"setting": setting, **_CPU, "threading": threading, "method": "sinkgd"}, "fraction", ">=", 0.85)
      for threading in _THREADINGS for setting, label in _SETTINGS.items()),
    Target("SWAN step / its compute floor, micro hidden matrices, CPU fp32", "compute_floor",
           {"setting": "micro", **_CPU, "method": "swan"}, "ratio", "<=", 1.3),
    Target("SWAN step / its compute floor, 1b block, CPU fp32", "compute_floor",
           {"setting": "block-1b", **_CPU, "method": "swan"}, "ratio", "<=", 1.3),
    *(Target(f"optimizer phase of a nano training step, SinkGD / AdamW(fused), CPU, {threading}", "train_throughput",
             {**_NANO_SINKGD, "threading": threading}, "optimizer_ratio", "<=", 1.0) for threading in _THREADINGS),
    Target("training tokens/s SinkGD / AdamW(fused), nano, CPU, 1 thread: upper end of the 95 % interval "
           "(not slower)", "train_throughput", {**_NANO_SINKGD, "threading": "1 thread"}, "ratio_high", ">=", 1.0),
    Target("host syncs inside one SinkGD step (most over the settings measured)", "optimizer_step",
           {"method": "sinkgd"}, "host_syncs", "==", 0, reduce="max"),
    Target("SinkGD step / AdamW(fused) step, 1b block, GPU bf16", "optimizer_step",
           {"setting": "block-1b", "device": "cuda", "dtype": "bfloat16", "method": "sinkgd",
            "baseline": "adamw-fused"}, "ratio", "<=", 1.0),
)


def _matched(target: Target, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame | None:
    """The rows of the target's table that match its ``where``, with a numeric ``target.column``."""
    frame = tables.get(target.table)
    if frame is None or frame.empty or target.column not in frame:
        return None
    mask = pd.Series(True, index=frame.index)
    for key, value in target.where.items():
        if key not in frame:
            return None
        mask &= frame[key] == value
    rows = frame.loc[mask].assign(**{target.column: pd.to_numeric(frame.loc[mask, target.column], errors="coerce")})
    rows = rows.dropna(subset=[target.column])
    return None if rows.empty else rows


def _floor(row: pd.Series, tables: Mapping[str, pd.DataFrame]) -> float | None:
    """bandwidth_bound's floor ratio for the setting, device, dtype and thread count of a step row."""
    bandwidth = tables.get("bandwidth")
    if bandwidth is None or bandwidth.empty:
        return None
    bound = bandwidth_bound(bandwidth)
    mask = pd.Series(True, index=bound.index)
    for key in ("setting", "device", "dtype", "threads"):
        if key in bound and key in row and not pd.isna(row[key]):
            mask &= bound[key] == row[key]
    found = bound.loc[mask, "floor_ratio"]
    return float(found.iloc[0]) if len(found) == 1 else None


def evaluate_targets(tables: Mapping[str, pd.DataFrame], targets=TARGETS) -> pd.DataFrame:
    """One row per target: ``target, measured, threshold, floor, status``. ``floor``: the best value the
    machine's memory traffic permits, for the step ratio targets (:func:`bandwidth_bound`). Status: met, not
    met, out of reach here (not met, and the floor itself is beyond the threshold: no implementation meets
    it on this machine), or not measured."""
    rows = []
    for t in targets:
        matched = _matched(t, tables)
        value = floor = None
        if matched is not None:
            pick = matched[t.column].idxmax() if t.reduce == "max" else matched.index[0]
            value = float(matched.loc[pick, t.column])
            floor = _floor(matched.loc[pick], tables) if t.floored else None
        if value is None:
            status = "not measured"
        elif _OPS[t.op](value, t.threshold):
            status = "met"
        else:
            status = "out of reach here" if floor is not None and not _OPS[t.op](floor, t.threshold) else "not met"
        rows.append({"target": t.name, "measured": value, "threshold": f"{t.op} {t.threshold:g}", "floor": floor,
                     "status": status})
    return pd.DataFrame(rows, columns=["target", "measured", "threshold", "floor", "status"])


def read_tables(out: Path) -> dict[str, pd.DataFrame]:
    """The benchmark CSVs present in ``out``, by stem."""
    return {name: pd.read_csv(out / f"{name}.csv") for name in TABLES if (out / f"{name}.csv").exists()}


# ------------------------------------------------------------------------------------------------------------
# README summary


def _table(frame: pd.DataFrame) -> str:
    from ..studies.report import markdown_table

    return markdown_table(frame)


def _threads(row: Mapping) -> str:
    """", 1 thread" / ", 2 threads" for a row that records its thread count, else nothing."""
    threads = row.get("threads")
    if threads is None or pd.isna(threads):
        return ""
    return f", {int(threads)} thread" + ("s" if int(threads) != 1 else "")


def _fmt(value, spec: str) -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def bandwidth_bound(bandwidth: pd.DataFrame) -> pd.DataFrame:
    """Per setting (and thread count, where recorded), SinkGD's bound (``bound_ms``: the bytes it must take
    from memory at the machine's measured bandwidth, the re-reads a last-level cache could serve left out;
    ``floor_ms`` for rows measured without it) divided by the measured AdamW(fused) step: the lowest step
    ratio the SinkGD step's memory traffic permits."""
    keys = ["setting", "device", "dtype"] + (["threads"] if "threads" in bandwidth else [])
    sinkgd = bandwidth[bandwidth["method"] == "sinkgd"]
    bound = sinkgd["bound_ms"].fillna(sinkgd["floor_ms"]) if "bound_ms" in sinkgd else sinkgd["floor_ms"]
    sink = sinkgd.assign(bound=bound).set_index(keys)["bound"]
    adam = bandwidth[bandwidth["method"] == "adamw-fused"].set_index(keys)["step_ms"]
    joined = pd.concat({"sinkgd_floor_ms": sink, "adamw_fused_ms": adam}, axis=1).dropna()
    return joined.assign(floor_ratio=joined["sinkgd_floor_ms"] / joined["adamw_fused_ms"]).reset_index()


def _interval(row) -> str:
    low, high = getattr(row, "ratio_low", None), getattr(row, "ratio_high", None)
    if low is None or pd.isna(low) or row.optimizer == row.baseline:
        return ""
    return f" [{low:.3f}, {high:.3f}]"


def _phase(row) -> str:
    ms = getattr(row, "optimizer_ms", None)
    if ms is None or pd.isna(ms):
        return ""
    ratio = getattr(row, "optimizer_ratio", None)
    shown = ratio is not None and not pd.isna(ratio) and row.optimizer != row.baseline
    versus = f", {ratio:.2f}x {row.baseline}'s" if shown else ""
    return f"; optimizer {ms:.1f} ms{versus}"


def summary_markdown(tables: Mapping[str, pd.DataFrame], targets: pd.DataFrame, env: Mapping | None) -> str:
    """A short markdown summary (targets, training-step profile, throughput) for a README section."""
    env = env or {}
    lines = ["<!-- written by `python -m multinorm.bench`; edits are overwritten -->"]
    if env.get("quick"):
        lines.append("**Quick run (tiny sizes): these numbers do not measure the targets.**\n")
    parts = env.get("measured") or {}
    when = ("; ".join(f"{part} {date[:10]}" for part, date in parts.items()) if parts else env.get("date", "?"))
    lines.append(f"Measured ({when}) on {env.get('cpu', '?')} ({env.get('torch_threads', '?')} torch "
                 f"thread(s); GPU: {env.get('gpu') or 'none'}), torch {env.get('torch', '?')}. Ratios are medians "
                 f"of per-round ratios of interleaved measurements; ranges are min-max over rounds.\n")
    shown = targets.assign(measured=[_fmt(v, ".3g") for v in targets["measured"]])
    if "floor" in shown:
        shown = shown.assign(floor=[_fmt(v, ".3g") if v is not None and not pd.isna(v) else "" for v in shown["floor"]])
    lines += ["**Targets**\n", _table(shown), ""]
    profile = tables.get("train_profile")
    by = ["device", "dtype"] + (["threads"] if profile is not None and "threads" in profile else [])
    for _, part in ([] if profile is None else profile.groupby(by, sort=False)):
        first = part.iloc[0]
        cell = part.assign(cell=[f"{ms:.1f} ms ({100 * f:.0f}%)"
                                 for ms, f in zip(part["ms_per_step"], part["fraction"])])
        wide = cell.pivot_table(index="phase", columns="optimizer", values="cell", aggfunc="first", sort=False)
        lines += [f"**Where a `{first['model']}` training step spends its time** (vocabulary "
                  f"{first.get('vocab_size', '?')}, {first['batch_size']} x {first['seq_len']} tokens, {first['device']} {first['dtype']}"
                  f"{_threads(first)}; evaluation amortized over its "
                  f"interval; torch.profiler)\n", _table(wide.reset_index()), ""]
    bandwidth = tables.get("bandwidth")
    if bandwidth is not None and not bandwidth.empty:
        columns = ["setting", "device", "dtype", "method", "MB", "step_ms", "floor_ms", "bound_ms", "achieved_gbs",
                   "machine_gbs", "fraction"]
        shown = bandwidth.assign(MB=bandwidth["bytes"] / 1e6)[[c for c in columns if c in bandwidth or c == "MB"]]
        cache = (env or {}).get("last_level_cache_bytes")
        cache_text = f" ({cache / 2**20:.0f} MiB here)" if cache else ""
        lines += ["**Bytes a step moves** (floor_ms: those bytes at the memory bandwidth measured with the "
                  "same threads, read-only passes at the read stream's rate and the rest at the best stream's; "
                  "bound_ms: the same without the repeated reads of each gradient that fits in the last-level "
                  f"cache{cache_text}, which a cache could serve; machine_gbs: the bytes over floor_ms; the "
                  "accounting is in bandwidth.csv)\n", _table(shown), ""]
        bound = bandwidth_bound(bandwidth)
        if not bound.empty:
            parts = [f"{r.setting} {r.device} {r.dtype}{_threads(r._asdict())}: {r.floor_ratio:.2f}"
                     for r in bound.itertuples()]
            lines += ["**What the bytes allow.** SinkGD's bound as a fraction of the AdamW(fused) step ("
                      + "; ".join(parts) + "): the bytes SinkGD must take from memory (one read of the gradient "
                      "per SR-Sinkhorn iteration, as its fused CPU loop does, except the re-reads of a matrix that "
                      "fits in the last-level cache, counted as free; bound_ms in bandwidth.csv), its read-only "
                      "passes at the machine's read bandwidth and the rest at its best stream. Where the bound "
                      "is above a step target's threshold, no implementation meets that target on this machine "
                      "(the targets' `floor` column; status \"out of reach here\"); where it is below, the gap is "
                      "the loop's, and `fraction` (every pass counted) says how near the loop comes to the "
                      "time of its bytes.", ""]
    throughput = tables.get("train_throughput")
    if throughput is not None and not throughput.empty:
        parts = [f"{r.device} {r.dtype}{_threads(r._asdict())} {r.optimizer} {r.tokens_per_s:,.0f} "
                 f"({_fmt(r.ratio, '.3f')}x {r.baseline}, "
                 f"{_fmt(r.ratio_min, '.3f')}-{_fmt(r.ratio_max, '.3f')}{_interval(r)}{_phase(r)})"
                 for r in throughput.itertuples()]
        lines += ["**Training tokens/s** (median over rounds, min-max, [95 % interval]; optimizer phase of a "
                  "step): " + "; ".join(parts) + ".", ""]
        sinkgd = throughput[throughput["optimizer"] == "sinkgd"]
        for r in ([] if profile is None else optimizer_ceiling(profile).itertuples()):
            same = sinkgd[(sinkgd["device"] == r.device) & (sinkgd["dtype"] == r.dtype)]
            if "threads" in sinkgd and hasattr(r, "threads"):
                same = same[same["threads"] == r.threads]
            if same.empty:
                continue
            s = same.iloc[0]
            lines += [f"**What the optimizer allows** ({r.model}, {r.device} {r.dtype}{_threads(r._asdict())}). "
                      f"AdamW's optimizer phase is "
                      f"{r.baseline_optimizer_ms:.1f} ms of its {r.step_ms:.0f} ms step: a SinkGD step that cost "
                      f"nothing would make training at most {r.ceiling:.3f}x as fast, and the measured SinkGD phase "
                      f"({r.method_optimizer_ms:.1f} ms) predicts {r.predicted:.3f}x. The rest of the step is the "
                      f"same work for both, so the measured {_fmt(s.ratio, '.3f')}x "
                      f"({_fmt(s.ratio_min, '.3f')}-{_fmt(s.ratio_max, '.3f')} over rounds) differs from it by "
                      f"round-to-round noise only. Hence the two training targets: the optimizer phase, which the "
                      f"optimizer decides, and a tokens/s interval that reaches 1 (not slower); whether the "
                      f"point estimate lands above 1 is decided by the noise, not by the optimizer.", ""]
    jobs = tables.get("jobs_throughput")
    if jobs is not None and not jobs.empty:
        best = jobs.loc[jobs["tokens_per_s"].idxmax()]
        parts = [f"JOBS={r.jobs} ({r.threads_per_run} thread(s) each) {r.tokens_per_s:,.0f} ({r.ratio:.2f}x)"
                 for r in jobs.itertuples()]
        lines += [f"**Runs at once** (`make figures JOBS=N`; AdamW training steps of `{best['model']}`, "
                  f"{best['batch_size']} x {best['seq_len']} tokens, all runs started together, tokens/s summed "
                  f"over the {int(best['cores'])} cores): " + "; ".join(parts)
                  + f". Fastest here: JOBS={best['jobs']}.", ""]
    return "\n".join(lines).rstrip() + "\n"

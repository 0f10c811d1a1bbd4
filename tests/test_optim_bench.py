"""multinorm.bench: the memory tracker and a small end-to-end run."""

from __future__ import annotations

import csv

import pytest
import torch

from multinorm import bench
from multinorm.optim import SinkGD


pytestmark = pytest.mark.usefixtures("one_thread")


def test_peak_extra_bytes_sees_transient_buffers_only():
    x = torch.randn(256, 256)

    def two_live_buffers():
        a = x * 2
        b = a + 1  # a and b alive together: 2 x 256 KiB
        del a
        return b.sum()

    peak, method = bench.peak_extra_bytes(two_live_buffers, [x], torch.device("cpu"))
    assert "dispatch" in method
    assert 2 * 256 * 256 * 4 <= peak < 2 * 256 * 256 * 4 + 1024
    # SinkGD's step keeps one float32 buffer of the largest gradient (plus vectors)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 64), (300, 128)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = SinkGD(params)
    peak, _ = bench.peak_extra_bytes(opt.step, [params, [p.grad for p in params], opt.state], torch.device("cpu"))
    assert 300 * 128 * 4 <= peak < 300 * 128 * 4 + 16 * 1024


def test_micro_run_writes_csv_and_reports_targets(tmp_path, capsys):
    rows = bench.main(["--settings", "micro", "--repeats", "1", "--out", str(tmp_path)])
    names = {r.method for r in rows}
    assert {"adamw-foreach", "sinkgd", "swan", "swan-nsds", "galore", "apollo-mini"} <= names
    with open(tmp_path / "optimizer_step.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    sink = next(r for r in table if r["method"] == "sinkgd")
    assert sink["hidden_state_bytes"] == "0" and float(sink["ratio"]) > 0 and sink["device"] == "cpu"
    assert next(r for r in table if r["method"] == "adamw-foreach")["ratio"] == "1.0000"
    out = capsys.readouterr().out
    assert "zero optimizer-state bytes for hidden matrices under sinkgd: 0 B" in out and "-> met" in out


def test_csv_round_trip_and_targets(tmp_path):
    from multinorm.bench import BenchRow, read_csv, write_csv, write_targets

    def row(setting, method, ms, ratio=None, hidden=None):
        return BenchRow(setting, method, "cpu", "float32", 1, ms, 3, ratio, "adamw-foreach", None, hidden, None, "", "")

    rows = [row("block-1b", "adamw-foreach", 100.0, 1.0, 400), row("block-1b", "sinkgd", 130.0, 1.3, 0),
            row("kernel", "sr-sinkhorn-fast", 10.0), row("kernel", "sr-sinkhorn-alternating", 50.0),
            row("micro", "swan", 5.0, 2.0, 0), row("micro", "swan-nsds", 4.0, 1.5, 8)]
    write_csv(rows, tmp_path / "optimizer_step.csv")
    assert read_csv(tmp_path / "optimizer_step.csv") == rows
    statuses = [t["status"] for t in write_targets(rows, tmp_path)]
    assert statuses == ["NOT met", "met", "met", "met", "NOT met"]  # 1.3x AdamW; 5x; 0 B; 0 B; 8 B
    assert (tmp_path / "targets.csv").read_text().count("\n") == 6

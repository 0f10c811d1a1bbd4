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

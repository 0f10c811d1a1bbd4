"""Training on two CPU processes (torchrun, gloo) logs the losses of the one-process run, and checkpoints
move between layouts: DDP -> FSDP2, 2 ranks -> 1 process, 1 process -> 2 ranks."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import multinorm.train as train_module
from multinorm.optim import OPTIMIZERS
from multinorm.train import TrainConfig, main, read_metrics, train
from test_train import cli_args

pytestmark = pytest.mark.usefixtures("data_cache_root")

SRC = Path(train_module.__file__).resolve().parents[2]
SIGNALLED = Path(__file__).resolve().parent / "train_signalled.py"


def config(tmp_path, **overrides):
    """24 steps of `nano` with SinkGD: sequences of 32 tokens, a global batch of 4 in 2 micro-batches, 3
    validation batches (3 + 3 + 2 sequences: uneven over two ranks). SinkGD, not SWAN: SWAN's whitening
    amplifies float rounding (one process with grad_accum 2 and with 1 differ by 3e-4 in validation loss
    after 8 steps), so only a method that does not can show equal losses to 1e-4 over dozens of steps."""
    settings = dict(model="nano", dataset="wiki-sample", vocab_size=4096, seq_len=32, batch_size=4, grad_accum=2,
                    tokens=4 * 32 * 24, eval_interval=8, log_interval=4, eval_tokens=32 * 8, eval_batch_size=3,
                    optimizer="sinkgd", lr=1e-3, results_dir=str(tmp_path / "runs"), progress=False)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache_root):
    """The metrics of the uninterrupted one-process run."""
    return read_metrics(train(config(tmp_path_factory.mktemp("reference"), run_id="one")).run_dir)


def torchrun(args, script=None, env=None, timeout=300):
    """`torchrun --standalone --nproc-per-node 2` of the trainer (or of `script`); returns the finished process."""
    target = [str(script)] if script else ["-m", "multinorm.train"]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, *args], env=environ, capture_output=True, text=True, timeout=timeout)


def assert_matches(rows, reference, upto=None):
    """Same steps, tokens and learning rates; train and validation losses within 1e-4."""
    want = [r for r in reference if upto is None or r["step"] <= upto]
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    for got, ref in zip(rows, want):
        assert got["tokens"] == ref["tokens"] and got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        for key in ("train_loss", "val_loss"):
            if ref[key] is None:
                assert got[key] is None, (got["step"], key)
            else:
                assert got[key] == pytest.approx(ref[key], abs=1e-4), (got["step"], key)


@pytest.mark.slow
def test_a_run_moves_from_one_process_to_ddp_to_fsdp_and_back(tmp_path, reference, signal_at):
    """One chain through every checkpoint layout, each leg ending with the uninterrupted one-process run's
    metrics: a single-process run stopped by SIGTERM after step 6 continues on 2 DDP ranks from its
    checkpoint.pt; SIGTERM on rank 1 alone stops both ranks after the same step with a sharded checkpoint
    (the newer layout is kept, the older removed); 2 FSDP2 ranks resume that to the end, and so does a single
    process from a copy of it."""
    cfg = config(tmp_path, run_id="cut")
    run_dir = Path(cfg.results_dir) / "cut"
    signal_at(step=5)
    assert train(cfg).status == "interrupted"
    assert (run_dir / "checkpoint.pt").exists()

    stopped = torchrun([*cli_args(cfg), "--parallel", "ddp", "--resume"], script=SIGNALLED,
                       env={"SIGNAL_RANK": "1", "SIGNAL_AT_STEP": "10"})
    assert stopped.returncode != 0, stopped.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps_done"] == 11, summary
    assert (run_dir / "checkpoint.dcp" / "trainer.pt").exists() and not (run_dir / "checkpoint.pt").exists()
    assert_matches(read_metrics(run_dir), reference, upto=11)
    shutil.copytree(run_dir, tmp_path / "runs" / "alone")

    resumed = torchrun([*cli_args(cfg), "--parallel", "fsdp", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("done:") == 1  # rank 0 alone reports
    assert_matches(read_metrics(run_dir), reference)

    alone = train(dataclasses.replace(cfg, run_id="alone"), resume=True)
    assert alone.status == "completed"
    assert_matches(read_metrics(alone.run_dir), reference)
    assert (alone.run_dir / "checkpoint.pt").exists() and not (alone.run_dir / "checkpoint.dcp").exists()


def test_parallel_modes_need_torchrun(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--no-progress", "--parallel", "fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --parallel fsdp needs processes started by torchrun") and "\n" not in err


@pytest.mark.parametrize("name", [n for n, spec in OPTIMIZERS.items() if not spec.sharded])
def test_optimizers_untested_on_sharded_parameters_are_refused_under_fsdp(name, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["--no-progress", "--parallel", "fsdp", "--optimizer", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {name} is not supported on FSDP2-sharded parameters") and "\n" not in err
    assert "sinkgd" in err and "swan" in err and err.endswith("use --parallel ddp")


def test_an_unknown_parallel_mode_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--parallel", "zero3"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "argument --parallel: invalid choice: 'zero3'" in last and "ddp" in last and "fsdp" in last


def test_the_global_batch_must_split_evenly_over_the_ranks(tmp_path, capsys, monkeypatch):
    """Checked from torchrun's environment before any process group or data exists."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = config(tmp_path, batch_size=6)  # 6 sequences over 2 ranks x 2 micro-batches
    assert main([*cli_args(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: batch_size (6) must be a multiple of processes x grad_accum (2 x 2): "
                   "each rank takes an equal share of every step's batch")
    assert not (tmp_path / "runs").exists()


def test_one_process_never_starts_a_process_group(tmp_path, monkeypatch):
    """Without torchrun the trainer runs as before: no process group, the single-file checkpoint."""
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: started.append(a))
    cfg = config(tmp_path, tokens=4 * 32 * 2, eval_interval=2, run_id="single")
    assert train(cfg).status == "completed"
    assert not started and not dist.is_initialized()
    assert (Path(cfg.results_dir) / "single" / "checkpoint.pt").exists()


class Killed(BaseException):
    """Stands for the process dying: nothing in the trainer catches it."""


def test_a_kill_while_a_distributed_checkpoint_is_swapped_in_leaves_the_previous_one(tmp_path, monkeypatch):
    import torch

    from multinorm.train import checkpoint
    from multinorm.parallel import Parallel

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save_sharded(tmp_path, model, optimizer, {"step": 1}, Parallel())
    real_replace, moves = os.replace, []

    def dying_replace(src, dst):
        moves.append(Path(dst).name)
        if Path(src).name == "checkpoint.dcp.tmp":  # the new checkpoint's rename into place
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        checkpoint.save_sharded(tmp_path, model, optimizer, {"step": 2}, Parallel())
    monkeypatch.undo()
    assert moves[-2:] == ["checkpoint.dcp.old", "checkpoint.dcp"]  # killed between the two renames
    folder = checkpoint.find_sharded(tmp_path)
    assert folder.name == "checkpoint.dcp.old" and checkpoint.read_trainer_state(folder)["step"] == 1
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    checkpoint.load_sharded(folder, model, optimizer)
    assert torch.equal(model.weight, before)

"""The trainer: end-to-end learning, determinism, exact resume after signals, run records and clear errors."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import multinorm.train as train_module
from multinorm.optim import OPTIMIZERS
from multinorm.train import TrainConfig, build_scheduler, load_checkpoint, main, read_metrics, train

# Metrics that measure the machine rather than the run.
VOLATILE = {"tokens_per_s", "wall_s", "peak_memory_bytes"}

# The runs read wiki-sample from the default cache, which this fixture builds once and exports.
pytestmark = pytest.mark.usefixtures("data_cache_root")


def tiny(tmp_path, **overrides):
    """A few-second run of `nano` on wiki-sample (sequences of 64 tokens, batch 4)."""
    settings = dict(model="nano", dataset="wiki-sample", vocab_size=4096, seq_len=64, batch_size=4,
                    tokens=4 * 64 * 12, eval_interval=4, log_interval=2, eval_tokens=64 * 16, eval_batch_size=8,
                    results_dir=str(tmp_path / "runs"), lr=3e-3, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def micro(tmp_path, **overrides):
    """A run of a handful of steps: sequences of 32 tokens, batch 2, a 256-token validation set."""
    settings = dict(seq_len=32, batch_size=2, tokens=2 * 32 * 6, eval_interval=4, log_interval=2,
                    eval_tokens=32 * 8, eval_batch_size=8, lr=1e-3)
    settings.update(overrides)
    return tiny(tmp_path, **settings)


def losses(rows):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def cli_args(cfg):
    """The command line that trains `cfg`."""
    args = ["--no-progress"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("progress", "save_checkpoint", "hparams") or value is None:
            continue
        args += [f"--{f.name.replace('_', '-')}", str(value)]
    args += [f"--hparam={k}={json.dumps(v)}" for k, v in cfg.hparams.items()]
    return args + ([] if cfg.save_checkpoint else ["--no-checkpoint"])


@pytest.fixture
def guarded_signals():
    """SIGINT/SIGTERM handlers that fail the test (instead of killing pytest) if the trainer lets one through."""
    def escaped(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the caller's handler")

    old = {sig: signal.signal(sig, escaped) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield escaped
    for sig, handler in old.items():
        signal.signal(sig, handler)


def reference_lr(step, steps, warmup_frac, min_lr_ratio):
    """The GaLore benchmark's schedule, written out: linear warm-up from 0, then cosine to min_lr_ratio."""
    warmup = int(warmup_frac * steps)
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("steps,warmup_frac,min_lr_ratio", [(100, 0.1, 0.1), (37, 0.1, 0.1), (12, 0.25, 0.0),
                                                             (50, 0.0, 0.3), (7, 0.5, 1.0), (1, 0.1, 0.1)])
def test_schedule_is_linear_warmup_then_cosine_to_the_min_ratio_at_every_step(steps, warmup_frac, min_lr_ratio):
    peak = 3e-3
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=peak)
    scheduler = build_scheduler(optimizer, steps, warmup_frac, min_lr_ratio)
    for step in range(steps + 1):
        expected = peak * reference_lr(step, steps, warmup_frac, min_lr_ratio)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-18), step
        optimizer.step()
        scheduler.step()


def test_schedule_state_resumes_exactly(tmp_path):
    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-2)
        return optimizer, build_scheduler(optimizer, 40, 0.1, 0.1)

    optimizer, scheduler = fresh()
    lrs = []
    for step in range(40):
        if step == 17:  # continue in a new optimizer and scheduler from their saved states, as a resume does
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp_path / "s.pt")
            optimizer, scheduler = fresh()
            state = torch.load(tmp_path / "s.pt", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-2 * reference_lr(s, 40, 0.1, 0.1) for s in range(40)], rel=1e-12)


@pytest.mark.slow
def test_nano_learns_wiki_sample(tmp_path):
    """AdamW on nano: the validation loss falls well below the uniform-guess loss ln(V)."""
    cfg = tiny(tmp_path, vocab_size=1024, seq_len=128, batch_size=8, tokens=8 * 128 * 40, eval_interval=20,
               lr=1e-2, eval_tokens=128 * 32)
    result = train(cfg)
    assert result.status == "completed"
    rows = read_metrics(result.run_dir)
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert vals[0] > math.log(1024) - 0.5
    assert vals[-1] < math.log(1024) - 0.8  # 6.96 -> 6.02 nats/token after 41k tokens when this was written (threshold 6.13)
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_run_record_holds_config_metrics_and_summary(tmp_path):
    result = train(tiny(tmp_path, run_id="record"))
    run_dir = result.run_dir
    assert run_dir.name == "record"
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["optimizer"] == "adamw" and record["steps"] == 12
    assert record["torch_version"] and "git_commit" in record
    assert record["optimizers"] == ["AdamW (fused): hidden, rest"]  # torch's fused kernel, on CPU too
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10, 12]
    for key in ("tokens", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "wall_s",
                "optimizer_state_bytes", "peak_memory_bytes"):
        assert key in rows[-1]
    assert rows[-1]["optimizer_state_bytes"] > 0  # AdamW keeps two moments
    # Each line's lr is the one its last step used (step 0: the first step's).
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * reference_lr(max(r["step"] - 1, 0), 12, 0.1, 0.1)
                                                     for r in rows], rel=1e-12)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_val_loss"] == rows[-1]["val_loss"]
    assert (run_dir / "checkpoint.pt").exists()


def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    a = read_metrics(train(tiny(tmp_path, run_id="a")).run_dir)
    b = read_metrics(train(tiny(tmp_path, run_id="b")).run_dir)
    c = read_metrics(train(tiny(tmp_path, run_id="c", seed=1)).run_dir)
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_exactly_after_a_sigterm(name, tmp_path, monkeypatch, signal_at, guarded_signals):
    """SIGTERM during step 3, between two metric lines, then resume: every metrics line equals the
    uninterrupted run's, through a real checkpoint file."""
    full = read_metrics(train(micro(tmp_path, optimizer=name, run_id="full")).run_dir)
    cfg = micro(tmp_path, optimizer=name, run_id="cut")
    signal_at(step=2)  # batch 2 is the third step's
    cut = train(cfg)
    assert cut.status == "interrupted" and cut.summary["signal"] == "SIGTERM"
    assert cut.summary["steps_done"] == 3 and load_checkpoint(cut.run_dir / "checkpoint.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is guarded_signals  # the caller's handler is back
    monkeypatch.undo()
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed"
    assert comparable(read_metrics(resumed.run_dir)) == comparable(full)
    assert resumed.summary["final_val_loss"] == full[-1]["val_loss"]


def test_sigint_without_checkpoints_stops_the_run_and_keeps_its_record(tmp_path, signal_at, guarded_signals):
    signal_at(step=1, signum=signal.SIGINT)
    result = train(micro(tmp_path, run_id="light", save_checkpoint=False))
    assert result.status == "interrupted" and result.summary["signal"] == "SIGINT"
    assert result.summary["steps_done"] == 2 and "cannot be resumed" in result.summary["message"]
    assert not (result.run_dir / "checkpoint.pt").exists()
    assert [r["step"] for r in read_metrics(result.run_dir)] == [0, 2]
    assert signal.getsignal(signal.SIGINT) is guarded_signals


def test_train_outside_the_main_thread_leaves_signals_alone(tmp_path, guarded_signals):
    results = []
    worker = threading.Thread(target=lambda: results.append(train(micro(tmp_path, tokens=2 * 32 * 2))))
    worker.start()
    worker.join()
    assert results[0].status == "completed"
    assert signal.getsignal(signal.SIGTERM) is guarded_signals


def _run_cli(args, **kwargs):
    src = str(Path(train_module.__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "multinorm.train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name,signame,cli_resume", [("sinkgd", "SIGTERM", False), ("adamw", "SIGINT", True),
                                                     ("galore", "SIGTERM", False)])
def test_cli_stops_cleanly_on_a_signal_from_outside_and_resumes_exactly(name, signame, cli_resume, tmp_path,
                                                                        one_thread):
    """A real signal sent to `python -m multinorm.train` once its first checkpoint exists; then `--resume`
    (in a new process, or through the API where the command line adds nothing but seconds of imports) ends
    with the metrics of an uninterrupted run."""
    signum = signal.Signals[signame]
    cfg = micro(tmp_path, optimizer=name, tokens=2 * 32 * 24, eval_interval=8, log_interval=3,
                checkpoint_interval=2, run_id="cut")
    # SIGINT must reach the child with Python's default handler even if this process ignores it.
    proc = _run_cli(cli_args(cfg), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = tmp_path / "runs" / "cut" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), proc.communicate()[1] if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps_done"] < summary["steps"]
    assert "--resume" in err.strip().splitlines()[-1]

    # the rest of the run and the reference need no checkpoints (each costs a synced write; none changes a metric)
    rest = dataclasses.replace(cfg, checkpoint_interval=0)
    if cli_resume:
        resumed = _run_cli([*cli_args(rest), "--resume"])
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
    else:
        assert train(rest, resume=True).status == "completed"
    full = train(dataclasses.replace(rest, run_id="full"))
    assert comparable(read_metrics(ckpt.parent)) == comparable(read_metrics(full.run_dir))


class Killed(BaseException):
    """Stands for the process dying: nothing in the trainer catches it."""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = micro(tmp_path, run_id="crash", checkpoint_interval=2)
    real_save = torch.save
    saves = []

    def dying_save(obj, f, *args, **kwargs):
        saves.append(obj["step"])
        if len(saves) == 2:  # the second checkpoint (step 4) dies half-written
            f.write(b"PK\x03\x04 half a checkpoint")
            raise Killed
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "crash"
    assert (run_dir / "checkpoint.pt.tmp").exists()
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2
    resumed = train(cfg, resume=True)
    full = train(dataclasses.replace(cfg, run_id="full"))
    assert resumed.status == "completed"
    assert comparable(read_metrics(resumed.run_dir)) == comparable(read_metrics(full.run_dir))


def test_divergence_stops_the_run_and_keeps_the_record(tmp_path, capsys):
    result = train(tiny(tmp_path, optimizer="sgd", lr=1e12, warmup_frac=0.0, run_id="boom"))
    assert result.status == "diverged"
    assert "lr" in result.summary["message"]
    rows = read_metrics(result.run_dir)
    assert rows[0]["step"] == 0 and not math.isfinite(rows[-1]["train_loss"])
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("args,message", [
    (["--model", "huge"], "valid models: nano"),
    (["--optimizer", "adamax"], "valid optimizers: adamw"),
    (["--dataset", "imagenet"], "valid datasets: wiki-sample"),
    (["--seq-len", "4096"], "outside 1..1024"),
    (["--tokens", "100"], "smaller than one step"),
    (["--lr=-1e-3"], "lr must be a finite number >= 0"),
    (["--lr", "nan"], "lr must be a finite number >= 0"),
    (["--lr", "inf"], "lr must be a finite number >= 0"),
    (["--hparam", "adam_lr=-1"], "adam_lr must be a finite number >= 0"),
    (["--hparam", "adam_lr=fast"], "adam_lr must be a finite number >= 0"),
    (["--results-dir", "/proc/forbidden"], "not writable"),
])
def test_cli_rejects_bad_input_with_one_line(args, message, capsys):
    assert main(["--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_any_finite_nonnegative_lr_is_accepted():
    for lr, hparams in ((0.0, {}), (0.0, {"adam_lr": 0.0}), (0.0, {"adam_lr": 3e-3}), (2.0, {"adam_lr": 0})):
        TrainConfig(lr=lr, hparams=hparams).validate()


def test_a_learning_rate_from_numpy_becomes_a_python_number_and_its_run_resumes(tmp_path, signal_at):
    """A grid computed with numpy (tuned lr x multipliers) gives numpy scalars; they are stored as Python
    floats, so the checkpoint loads with weights_only=True and the run resumes to the uninterrupted result."""
    lr = np.float64(1e-3) * np.float64(2.0)
    cfg = micro(tmp_path, optimizer="sinkgd", lr=lr, hparams={"adam_lr": np.float32(0.5) * 4e-3}, run_id="np")
    assert type(cfg.lr) is float and cfg.lr == 2e-3 and type(cfg.hparams["adam_lr"]) is float
    assert cfg.default_run_id() == micro(tmp_path, optimizer="sinkgd", lr=2e-3).default_run_id()
    full = train(dataclasses.replace(cfg, run_id="np-full"))
    signal_at(step=2)  # only the first run after this is signalled
    assert train(cfg).status == "interrupted"
    ckpt = load_checkpoint(tmp_path / "runs" / "np" / "checkpoint.pt")
    assert all(type(group["lr"]) is float for group in ckpt["optimizer"]["param_groups"])
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed"
    assert comparable(read_metrics(resumed.run_dir)) == comparable(read_metrics(full.run_dir))


def test_a_checkpoint_holding_numpy_scalars_still_loads(tmp_path):
    """Checkpoints written before learning rates were made Python floats hold numpy scalars: they load."""
    ckpt = train(micro(tmp_path, run_id="old", tokens=2 * 32 * 2)).run_dir / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    for group in state["optimizer"]["param_groups"]:
        group["lr"], group["initial_lr"] = np.float64(group["lr"]), np.float64(group["initial_lr"])
    torch.save({**state, "seen": np.float32(1.5), "count": np.int64(3)}, ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded["seen"] == np.float32(1.5) and loaded["count"] == 3
    assert loaded["optimizer"]["param_groups"][0]["lr"] == state["optimizer"]["param_groups"][0]["lr"]


class Foreign:
    """A class no checkpoint may hold: loading must refuse to run code from the file."""


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_cli_rejects_a_damaged_checkpoint_with_one_line(damage, tmp_path, capsys):
    cfg = micro(tmp_path, run_id="damaged", tokens=2 * 32 * 2)
    ckpt = train(cfg).run_dir / "checkpoint.pt"
    if damage == "foreign":
        state = load_checkpoint(ckpt)
        torch.save({**state, "extra": Foreign()}, ckpt)
    else:
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    assert main([*cli_args(cfg), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume: checkpoint") and "\n" not in err
    assert ("not allowed to load" in err and "Foreign" in err) if damage == "foreign" else "corrupt or truncated" in err


def test_resume_refuses_settings_that_change_the_run(tmp_path, capsys):
    cfg = micro(tmp_path, run_id="fixed", tokens=2 * 32 * 2)
    train(cfg)
    assert main([*cli_args(dataclasses.replace(cfg, lr=2e-3)), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "settings differ" in err and "lr" in err and "\n" not in err
    # How the run is kept may change.
    assert train(dataclasses.replace(cfg, checkpoint_interval=1, progress=True), resume=True).status == "completed"


def test_cli_refuses_to_overwrite_a_run_silently(tmp_path, capsys):
    cfg = micro(tmp_path, run_id="taken", tokens=2 * 32 * 2)
    train(cfg)
    args = cli_args(dataclasses.replace(cfg, lr=2e-3))
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((tmp_path / "runs" / "taken" / "config.json").read_text())["config"]["lr"] == 2e-3


def test_cli_help_lists_kebab_case_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--optimizer", "--tokens", "--grad-accum", "--eval-interval", "--resume", "--hparam"):
        assert flag in out


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_matches_the_papers_precision(tmp_path):
    """On a GPU the default dtype is pure bf16 (as in the benchmark); a short SinkGD run stays finite."""
    import torch

    result = train(tiny(tmp_path, device="cuda", optimizer="sinkgd", run_id="cuda"))
    assert result.status == "completed" and math.isfinite(result.summary["final_val_loss"])
    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["device_name"] == torch.cuda.get_device_name(0)
    assert result.summary["peak_memory_bytes"] > 0


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """Accumulating two half-batches gives (up to float rounding) the run of one full batch."""
    one = read_metrics(train(tiny(tmp_path, run_id="one", tokens=4 * 64 * 4, eval_interval=2)).run_dir)
    two = read_metrics(train(tiny(tmp_path, run_id="two", tokens=4 * 64 * 4, eval_interval=2, grad_accum=2)).run_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        if a["val_loss"] is not None:
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)


def test_a_run_without_checkpoints_leaves_none(tmp_path, capsys):
    cfg = micro(tmp_path, run_id="light", save_checkpoint=False, tokens=2 * 32 * 2)
    result = train(cfg)
    assert result.status == "completed" and not (result.run_dir / "checkpoint.pt").exists()
    assert main([*cli_args(cfg), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_lr_zero_with_adam_lr_freezes_only_the_hidden_matrices(tmp_path):
    """The convergence study's control: hidden matrices at lr 0, embeddings/head/norms trained by AdamW."""
    import torch

    from multinorm.llama import build_model, split_parameters

    result = train(tiny(tmp_path, run_id="frozen", lr=0.0, hparams={"adam_lr": 3e-3}, tokens=4 * 64 * 4))
    assert result.status == "completed"
    trained = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["model"]
    model = build_model("nano", 4096, seed=0)
    init = model.state_dict()
    hidden, _ = split_parameters(model)
    assert all(torch.equal(trained[name], init[name]) for name, _ in hidden)
    assert not torch.equal(trained["model.embed_tokens.weight"], init["model.embed_tokens.weight"])


def test_run_records_call_only_uncommitted_code_dirty(tmp_path):
    from multinorm.train.records import git_commit as _git_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "src").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "table.csv").write_text("a\n1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = _git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "results" / "table.csv").write_text("a\n2\n")  # a study rewriting its own results
    assert _git_commit(tmp_path) == clean
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert _git_commit(tmp_path) == clean + "-dirty"

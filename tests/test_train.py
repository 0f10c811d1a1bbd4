"""The trainer: end-to-end learning, determinism, exact resume, run records and clear errors."""

import json
import math

import pytest
import torch

from multinorm.train import TrainConfig, build_scheduler, main, read_metrics, train


def tiny(tmp_path, **overrides):
    """A few-second run of `nano` on wiki-sample (sequences of 64 tokens, batch 4)."""
    settings = dict(model="nano", dataset="wiki-sample", vocab_size=4096, seq_len=64, batch_size=4,
                    tokens=4 * 64 * 12, eval_interval=4, log_interval=2, eval_tokens=64 * 16, eval_batch_size=8,
                    results_dir=str(tmp_path / "runs"), lr=3e-3, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def losses(rows):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


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


def test_nano_learns_wiki_sample(tmp_path):
    """AdamW on nano: the validation loss falls well below the uniform-guess loss ln(V)."""
    cfg = tiny(tmp_path, seq_len=128, batch_size=8, tokens=8 * 128 * 120, eval_interval=40, lr=1e-2,
               eval_tokens=128 * 32)
    result = train(cfg)
    assert result.status == "completed"
    rows = read_metrics(result.run_dir)
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert vals[0] > math.log(4096) - 0.5
    assert vals[-1] < math.log(4096) - 1.5  # 8.3 -> below 6.8 nats/token after 123k tokens
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_run_record_holds_config_metrics_and_summary(tmp_path):
    result = train(tiny(tmp_path, run_id="record"))
    run_dir = result.run_dir
    assert run_dir.name == "record"
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["optimizer"] == "adamw" and record["steps"] == 12
    assert record["torch_version"] and "git_commit" in record
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


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = read_metrics(train(tiny(tmp_path, run_id="full")).run_dir)
    cfg = tiny(tmp_path, run_id="cut", checkpoint_interval=2)
    assert train(cfg, stop_after=6).status == "interrupted"
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed"
    assert losses(read_metrics(resumed.run_dir)) == losses(full)


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


def test_cli_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    result = train(tiny(tmp_path, run_id="corrupt"))
    (result.run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code = main(["--no-progress", "--results-dir", str(tmp_path / "runs"), "--run-id", "corrupt", "--resume",
                 "--seq-len", "64", "--batch-size", "4", "--tokens", str(4 * 64 * 12)])
    assert code == 2
    assert "corrupt" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_a_run_silently(tmp_path, capsys):
    cfg = tiny(tmp_path, run_id="taken")
    train(cfg)
    args = ["--no-progress", "--results-dir", cfg.results_dir, "--run-id", "taken", "--seq-len", "64",
            "--batch-size", "4", "--tokens", str(4 * 64 * 4), "--eval-tokens", "1024"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


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
    result = train(tiny(tmp_path, run_id="light", save_checkpoint=False, tokens=4 * 64 * 2))
    assert result.status == "completed" and not (result.run_dir / "checkpoint.pt").exists()
    assert main(["--no-progress", "--results-dir", str(tmp_path / "runs"), "--run-id", "light", "--resume",
                 "--seq-len", "64", "--batch-size", "4", "--tokens", str(4 * 64 * 2)]) == 2
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

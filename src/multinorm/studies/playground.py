"""The playground of notebook 00: short training runs at chosen settings, drawn against the study's tuned curves.

    Settings          one short run: optimizer, learning rates, method options, steps, batch, seed, model
    BackgroundRun     `python -m multinorm.train` for one run in a subprocess; `stop()` is a Ctrl-C
    LossPlot          validation (and training) loss against tokens, over the convergence study's tuned curve
    Playground        the widgets: a Train button that runs in the background with a live plot, a Stop button
    lr_sweep          a few short runs of one optimizer at several learning rates (`multinorm.studies.sweep.run_grid`)

Every run is an ordinary run record under `results/runs/playground/`. Relative paths are taken from the
repository root, so the notebook gives the same results when it is opened from `notebooks/`.

The trainer stops cleanly only on SIGINT/SIGTERM, delivered to the process that trains. A background
run therefore trains in a subprocess, and Stop sends it SIGINT once its signal handler is in place (after
the first line of metrics.jsonl): the current step finishes and the summary says "interrupted".
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from multinorm.optim import OPTIMIZERS
from multinorm.paths import child_env, repo_root
from multinorm.paths import resolve as repo_path  # `path` if absolute, else under the repository root
from multinorm.studies.report import method_label
from multinorm.studies.sweep import config_key, load_curves, run_grid, run_id
from multinorm.train import TrainConfig

__all__ = ["REPO", "RUNS_DIR", "CURVES_CSV", "FINAL_RUNS_CSV", "repo_path", "Settings", "tuned_run", "reference_curve",
           "reference_train_curve",
           "BackgroundRun", "LossPlot", "run_figure", "describe", "Playground", "lr_sweep", "sweep_figure"]

REPO = repo_root()
RUNS_DIR = "results/runs/playground"
CURVES_CSV = "results/convergence/curves.csv"          # mean validation curve per method, over seeds
FINAL_RUNS_CSV = "results/convergence/final_runs.csv"  # the reported runs, with their lr and hyper-parameters
MODELS = ("nano", "micro")                             # the CPU-sized models


@dataclass
class Settings:
    """One short run. The widgets set the first block; the second is fixed by the notebook's parameters.

    Defaults: nano on wiki-sample at the convergence study's vocabulary, batch and sequence length, 64 steps of
    8 x 256 tokens (131k tokens) and 5 evaluations on 8k tokens: under a minute on 2 CPU cores, start-up included.
    """

    optimizer: str = "sinkgd"
    lr: float = 2.5e-4        # the hidden matrices' lr (every parameter's for adamw and sgd)
    adam_lr: float = 2e-3     # AdamW's lr on embeddings, LM head and norms (mixed optimizers)
    iters: int = 5            # SR-Sinkhorn passes L (sinkgd, mngd)
    gradnorm: bool = True     # SWAN's GradNorm stage (swan, swan-nsds)
    whiten: bool = True       # SWAN's whitening stage (swan, swan-nsds)
    steps: int = 64
    batch_size: int = 8
    seed: int = 0
    model: str = "nano"

    seq_len: int = 256
    vocab_size: int = 1024
    eval_interval: int = 16
    eval_tokens: int = 8_192
    eval_batch_size: int = 16
    extra_hparams: dict[str, Any] = field(default_factory=dict)  # e.g. the study's tuned adam_betas

    def hparams(self) -> dict[str, Any]:
        """The optimizer's hyper-parameters: only those it accepts, so sgd gets no adam_lr and adamw no iters."""
        accepted = OPTIMIZERS[self.optimizer].defaults if self.optimizer in OPTIMIZERS else {}
        chosen = {"adam_lr": self.adam_lr, "iters": self.iters, "gradnorm": self.gradnorm, "whiten": self.whiten}
        return {k: v for k, v in {**self.extra_hparams, **chosen}.items() if k in accepted}

    def config(self, runs_dir: str | Path = RUNS_DIR) -> TrainConfig:
        """The run's TrainConfig; its folder is named like a study run's, so the same settings reuse one folder."""
        cfg = TrainConfig(model=self.model, dataset="wiki-sample", vocab_size=self.vocab_size, seq_len=self.seq_len,
                          optimizer=self.optimizer, lr=self.lr, hparams=self.hparams(),
                          tokens=self.steps * self.batch_size * self.seq_len, batch_size=self.batch_size,
                          eval_interval=self.eval_interval, eval_tokens=self.eval_tokens,
                          eval_batch_size=self.eval_batch_size, log_interval=1, save_checkpoint=False,
                          seed=self.seed, results_dir=str(repo_path(runs_dir)), progress=False)
        cfg.run_id = run_id(self.optimizer, self.lr, self.seed, config_key(cfg))
        return cfg

    def tuned(self, final_runs_csv: str | Path = FINAL_RUNS_CSV) -> Settings | None:
        """These settings with the convergence study's tuned lr and AdamW lr of the optimizer, and its other
        hyper-parameters (e.g. adam_betas) as `extra_hparams`; None if the study has no tuned run of it.
        The options with a widget (iters, gradnorm, whiten) keep their values here."""
        found = tuned_run(self.optimizer, final_runs_csv)
        if found is None:
            return None
        lr, hparams = found
        extra = {k: v for k, v in hparams.items() if k != "adam_lr"}
        return dataclasses.replace(self, lr=lr, adam_lr=hparams.get("adam_lr", lr), extra_hparams=extra)


def tuned_run(method: str, final_runs_csv: str | Path = FINAL_RUNS_CSV) -> tuple[float, dict[str, Any]] | None:
    """The convergence study's tuned (lr, hyper-parameters) of `method`: those of its reported seed-0 run.
    None if the study's table is missing or lacks the method."""
    path = repo_path(final_runs_csv)
    if not path.exists():
        return None
    runs = pd.read_csv(path)
    runs = runs[(runs.method == method) & (runs.seed == 0)]
    if runs.empty:
        return None
    row = runs.iloc[0]
    return float(row.lr), json.loads(row.hparams) if isinstance(row.hparams, str) else {}


def reference_curve(method: str, curves_csv: str | Path = CURVES_CSV) -> tuple[pd.DataFrame | None, str]:
    """The study's mean validation curve of `method` (columns tokens, mean and, if recorded, ci_low/ci_high)
    and a line saying what it is, or (None, why there is none)."""
    path = repo_path(curves_csv)
    if not path.exists():
        return None, f"no tuned curve: {curves_csv} is missing; live curve only"
    curves = pd.read_csv(path)
    curve = curves[curves.method == method].sort_values("tokens")
    if curve.empty:
        return None, f"no tuned curve: {curves_csv} has no {method_label(method)}; live curve only"
    return curve, (f"convergence study, tuned {method_label(method)}: mean over seeds of "
                   f"{curve.tokens.max():,.0f}-token runs (their own warm-up and cosine schedule)")


def reference_train_curve(method: str, final_runs_csv: str | Path = FINAL_RUNS_CSV) -> pd.DataFrame | None:
    """The mean training loss (columns tokens, mean) of the convergence study's reported runs of `method`, from
    their run records (``results/runs/convergence/<run_id>/metrics.jsonl``, next to `final_runs_csv`'s folder):
    logged every few steps, it shows the shape between the validation points. None if no record is there."""
    path = repo_path(final_runs_csv)
    if not path.exists():
        return None
    runs = pd.read_csv(path)
    if "run_id" not in runs:
        return None
    folder = path.parent.parent / "runs" / "convergence"
    rows = [r for run in runs.loc[runs.method == method, "run_id"] if (folder / run / "metrics.jsonl").exists()
            for r in _complete_rows(folder / run) if r.get("train_loss") is not None]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    return frame.groupby("tokens", as_index=False).train_loss.mean().rename(columns={"train_loss": "mean"})


def _complete_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as written so far: complete lines only (the trainer may be appending one)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def _summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


# The child restores Python's SIGINT handler first: a Jupyter kernel ignores SIGINT between cells, children
# inherit an ignored signal, and the trainer leaves an ignored signal ignored.
_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from multinorm.train import main; sys.exit(main())")


def _cli_args(cfg: TrainConfig) -> list[str]:
    """The `python -m multinorm.train` arguments that train `cfg`."""
    args = ["--no-progress"] + ([] if cfg.save_checkpoint else ["--no-checkpoint"])
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in ("progress", "save_checkpoint", "hparams") and value is not None:
            args += [f"--{f.name.replace('_', '-')}", str(value)]
    return args + [f"--hparam={k}={json.dumps(v)}" for k, v in cfg.hparams.items()]


def _interrupt(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)


class BackgroundRun:
    """One run of `python -m multinorm.train` in a subprocess, replacing an earlier run in the same folder.

    Its output goes to `<run folder>/train.log`. `stop()` asks it to stop as Ctrl-C does; a request made before
    the trainer is ready for it (imports, data, model build) is delivered by `deliver_stop()` once it is.
    """

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg, self.run_dir = cfg, Path(cfg.results_dir) / cfg.run_id
        self.stop_requested, self._signalled = False, False
        shutil.rmtree(self.run_dir, ignore_errors=True)  # no stale metrics for the plot to read
        self.run_dir.mkdir(parents=True)
        with open(self.run_dir / "train.log", "w") as log:  # the child imports this same package
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD, *_cli_args(cfg)], cwd=REPO, env=child_env(),
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # A kernel that shuts down (or drops this object) does not leave the run training on its own.
        weakref.finalize(self, _interrupt, self.process)

    def running(self) -> bool:
        return self.process.poll() is None

    def rows(self) -> list[dict[str, Any]]:
        return _complete_rows(self.run_dir)

    def summary(self) -> dict[str, Any] | None:
        return _summary(self.run_dir)

    def stop(self) -> None:
        self.stop_requested = True
        self.deliver_stop()

    def deliver_stop(self) -> None:
        """Send the requested SIGINT once the trainer handles it: its first metrics line is written inside
        the handler's scope. Earlier, Python's default handler would abort the run without a record."""
        if self.stop_requested and not self._signalled and self.running() and self.rows():
            self.process.send_signal(signal.SIGINT)
            self._signalled = True

    def log_tail(self, lines: int = 3) -> str:
        path = self.run_dir / "train.log"
        return "\n".join(path.read_text().strip().splitlines()[-lines:]) if path.exists() else ""


class LossPlot:
    """Validation loss (points) and training loss (thin line) against tokens, over the study's tuned curve.

    The x axis spans this run's budget; the tuned curve is cut there. `update(rows)` takes metrics.jsonl rows.
    """

    # Validation losses of the untrained model (token 0) further apart than this mean another setting.
    SAME_START = 0.1

    def __init__(self, cfg: TrainConfig, method: str | None = None, curves_csv: str | Path = CURVES_CSV,
                 final_runs_csv: str | Path = FINAL_RUNS_CSV):
        self.budget = cfg.tokens
        self.reference, self.note = reference_curve(method or cfg.optimizer, curves_csv)
        self.figure = Figure(figsize=(8, 4.5), layout="constrained")
        ax = self.ax = self.figure.add_subplot()
        if self.reference is not None:
            ref = self.reference
            train = reference_train_curve(method or cfg.optimizer, final_runs_csv)
            if train is not None:
                ax.plot(train.tokens, train["mean"], color="gray", lw=0.9, alpha=0.7,
                        label="tuned: training loss (mean of seeds)")
            ax.plot(ref.tokens, ref["mean"], "o-", color="gray", lw=1.8, ms=4,
                    label="tuned: validation loss (convergence study)")
            if {"ci_low", "ci_high"} <= set(ref.columns):
                ax.fill_between(ref.tokens, ref.ci_low, ref.ci_high, color="gray", alpha=0.2, lw=0)
        self.train_line, = ax.plot([], [], color="C0", lw=0.8, alpha=0.6, label="this run: training loss")
        self.val_line, = ax.plot([], [], "o-", color="C1", lw=1.6, ms=4, label="this run: validation loss")
        ax.set_xlim(0, self.budget * 1.02)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/token)")
        self.heading = (f"{method_label(cfg.optimizer)}, lr {cfg.lr:g}, {cfg.model}, {cfg.steps} steps"
                        f" of {cfg.tokens_per_step:,} tokens")
        ax.set_title(f"{self.heading}\n{self.note}", fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
        self.comparable = True  # until the untrained model's loss says otherwise (see update)
        self.updates = 0

    def update(self, rows: list[dict[str, Any]]) -> None:
        train_rows = [r for r in rows if r.get("train_loss") is not None and math.isfinite(r["train_loss"])]
        val_rows = [r for r in rows if r.get("val_loss") is not None]
        self.train_line.set_data([r["tokens"] for r in train_rows], [r["train_loss"] for r in train_rows])
        self.val_line.set_data([r["tokens"] for r in val_rows], [r["val_loss"] for r in val_rows])
        if self.comparable and val_rows and self.reference is not None \
                and val_rows[0]["tokens"] == 0 == self.reference.tokens.iloc[0]:
            start, ref_start = val_rows[0]["val_loss"], self.reference["mean"].iloc[0]
            if abs(start - ref_start) > self.SAME_START:
                self.comparable = False
                self.note = (f"not comparable: the untrained model's loss is {start:.2f} here, {ref_start:.2f} in the "
                             "study (another model, vocabulary or validation set)")
                self.ax.set_title(f"{self.heading}\n{self.note}", fontsize=9, color="firebrick")
        shown = [r["train_loss"] for r in train_rows] + [r["val_loss"] for r in val_rows]
        if self.reference is not None and self.comparable:
            shown += self.reference.loc[self.reference.tokens <= self.budget * 1.02, "mean"].tolist()
        if shown:
            lo, hi = min(shown), max(shown)
            pad = 0.05 * (hi - lo) + 0.05
            self.ax.set_ylim(lo - pad, hi + pad)
        self.updates += 1

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def run_figure(run_dir: str | Path, curves_csv: str | Path = CURVES_CSV) -> Figure:
    """The loss plot of the run recorded in `run_dir`."""
    run_dir = Path(run_dir)
    recorded = json.loads((run_dir / "config.json").read_text())["config"]
    cfg = TrainConfig(**{k: v for k, v in recorded.items() if k in {f.name for f in fields(TrainConfig)}})
    plot = LossPlot(cfg, curves_csv=curves_csv)
    plot.update(_complete_rows(run_dir))
    return plot.figure


def describe(summary: dict[str, Any] | None) -> str:
    """One line about a finished run."""
    if summary is None:
        return "no summary"
    if summary["status"] == "completed":
        return (f"completed: final validation loss {summary['final_val_loss']:.4f} "
                f"(ppl {summary['final_val_ppl']:.1f}), {summary['tokens_per_s'] or 0:,.0f} tokens/s, "
                f"{summary['wall_s']:.0f} s of training")
    return f"{summary['status']}: {summary['message']}"


class Playground:
    """The widgets of notebook 00. Train starts a `BackgroundRun` and a thread that redraws the plot from its
    metrics every `poll_s` seconds; Stop stops the run cleanly. `wait()` blocks until the run is over.

    `base` gives the starting values and the settings that have no widget (sequence length, vocabulary,
    evaluation). Choosing an optimizer sets the learning rates (and AdamW betas) to the study's tuned ones.
    """

    def __init__(self, base: Settings | None = None, runs_dir: str | Path = RUNS_DIR,
                 curves_csv: str | Path = CURVES_CSV, final_runs_csv: str | Path = FINAL_RUNS_CSV,
                 poll_s: float = 0.5):
        import ipywidgets as w

        self.base = base or Settings()
        self.runs_dir, self.curves_csv, self.final_runs_csv, self.poll_s = runs_dir, curves_csv, final_runs_csv, poll_s
        self.run: BackgroundRun | None = None
        self.plot: LossPlot | None = None
        self._watcher: threading.Thread | None = None
        b, wide = self.base, {"description_width": "initial"}
        self.optimizer = w.Dropdown(options=list(OPTIMIZERS), value=b.optimizer, description="optimizer", style=wide)
        self.model = w.Dropdown(options=MODELS, value=b.model, description="model", style=wide)
        self.lr = w.FloatText(value=b.lr, description="hidden-matrix lr", style=wide)
        self.adam_lr = w.FloatText(value=b.adam_lr, description="AdamW lr (rest)", style=wide)
        self.iters = w.IntSlider(value=b.iters, min=1, max=20, description="SR-Sinkhorn passes L", style=wide)
        self.gradnorm = w.Checkbox(value=b.gradnorm, description="GradNorm", indent=False)
        self.whiten = w.Checkbox(value=b.whiten, description="whitening", indent=False)
        self.steps = w.IntSlider(value=b.steps, min=1, max=400, description="steps", style=wide)
        self.batch_size = w.Dropdown(options=sorted({1, 2, 4, 8, 16, 32, b.batch_size}), value=b.batch_size,
                                     description="batch (sequences)", style=wide)
        self.seed = w.IntText(value=b.seed, description="seed", style=wide)
        self.train_button = w.Button(description="Train", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.status = w.HTML()
        self.output = w.Output()
        self.train_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.optimizer.observe(lambda change: self._optimizer_changed(change["new"]), names="value")
        self.extra_hparams = dict(b.extra_hparams)
        self._show_options(b.optimizer)
        self.widget = w.VBox([
            w.HBox([self.optimizer, self.model]), w.HBox([self.lr, self.adam_lr]),
            w.HBox([self.iters, self.gradnorm, self.whiten]), w.HBox([self.steps, self.batch_size, self.seed]),
            w.HBox([self.train_button, self.stop_button, self.status]), self.output])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _show_options(self, optimizer: str) -> None:
        """Show only the widgets the optimizer takes."""
        accepted = OPTIMIZERS[optimizer].defaults
        for key, widget in (("adam_lr", self.adam_lr), ("iters", self.iters), ("gradnorm", self.gradnorm),
                            ("whiten", self.whiten)):
            widget.layout.display = None if key in accepted else "none"

    def _optimizer_changed(self, optimizer: str) -> None:
        self._show_options(optimizer)
        found = dataclasses.replace(self.settings(), optimizer=optimizer, extra_hparams={}).tuned(self.final_runs_csv)
        if found is None:
            self.extra_hparams = {}
            self.status.value = f"no tuned run of {method_label(optimizer)} in {self.final_runs_csv}; lr kept"
            return
        self.lr.value, self.adam_lr.value, self.extra_hparams = found.lr, found.adam_lr, found.extra_hparams
        extra = ", ".join(f"{k}={v}" for k, v in found.hparams().items() if k in found.extra_hparams)
        extra = f" ({extra})" if extra else ""
        self.status.value = f"lr set to the study's tuned {method_label(optimizer)} run{extra}"

    def settings(self) -> Settings:
        b = self.base
        return Settings(optimizer=self.optimizer.value, lr=self.lr.value, adam_lr=self.adam_lr.value,
                        iters=self.iters.value, gradnorm=self.gradnorm.value, whiten=self.whiten.value,
                        steps=self.steps.value, batch_size=self.batch_size.value, seed=self.seed.value,
                        model=self.model.value, seq_len=b.seq_len, vocab_size=b.vocab_size,
                        eval_interval=b.eval_interval, eval_tokens=b.eval_tokens, eval_batch_size=b.eval_batch_size,
                        extra_hparams=self.extra_hparams)

    def start(self) -> None:
        """Start a run with the widgets' settings (the Train button)."""
        if self.run is not None and self.run.running():
            return
        try:
            cfg = self.settings().config(self.runs_dir)
            self.run = BackgroundRun(cfg)
        except ValueError as exc:  # ConfigError: a bad setting
            self.status.value = f"<b>not started</b>: {exc}"
            return
        self.plot = LossPlot(cfg, curves_csv=self.curves_csv, final_runs_csv=self.final_runs_csv)
        self._draw()
        self.train_button.disabled, self.stop_button.disabled = True, False
        self.status.value = f"starting {cfg.run_id} ({cfg.steps} steps) ..."
        self._watcher = threading.Thread(target=self._watch, args=(self.run,), daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop the run after its current step (the Stop button)."""
        if self.run is not None and self.run.running():
            self.run.stop()
            self.stop_button.disabled = True
            self.status.value = "stopping after the current step ..."

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Block until the run and its last redraw are done; return its summary."""
        if self._watcher is not None:
            self._watcher.join(timeout)
        return self.run.summary() if self.run is not None else None

    def _draw(self) -> None:
        # Replacing the Output's outputs is safe from a thread, unlike printing into it.
        data = {"image/png": base64.b64encode(self.plot.png()).decode(), "text/plain": "<loss plot>"}
        self.output.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)

    def _watch(self, run: BackgroundRun) -> None:
        try:
            self._follow(run)
            summary = run.summary()
            self.status.value = (f"{describe(summary)} ({run.cfg.run_id})" if summary is not None else
                                 f"<b>failed</b> (exit code {run.process.returncode}): {run.log_tail()}")
        except Exception as exc:  # shown, not lost in a thread
            self.status.value = f"<b>plot stopped</b>: {type(exc).__name__}: {exc}"
            raise
        finally:
            self.train_button.disabled, self.stop_button.disabled = False, True

    def _follow(self, run: BackgroundRun) -> None:
        """Redraw from the run's metrics until its process has exited (then once more)."""
        seen = -1
        while True:
            done = not run.running()
            run.deliver_stop()
            rows = run.rows()
            if len(rows) != seen:
                seen = len(rows)
                self.plot.update(rows)
                self._draw()
                if rows and not done and not run.stop_requested:
                    self.status.value = f"step {rows[-1]['step']} of {run.cfg.steps}"
            if done:
                return
            time.sleep(self.poll_s)


def lr_sweep(settings: Settings, lrs: list[float], runs_dir: str | Path = f"{RUNS_DIR}/sweep",
             mode: str = "resume") -> tuple[pd.DataFrame, pd.DataFrame]:
    """`settings` at each lr of `lrs` (`multinorm.studies.sweep.run_grid`; in "resume" mode finished runs are kept).
    Returns the summary table (one row per lr) and the validation curves (run_id, tokens, val_loss, ...)."""
    base = settings.config(runs_dir)
    results_dir = repo_path(runs_dir)
    table = run_grid(base, [{"lr": lr} for lr in lrs], results_dir, mode=mode, progress=False)
    return table, load_curves(results_dir, table.run_id)


def sweep_figure(table: pd.DataFrame, curves: pd.DataFrame) -> Figure:
    """Left: the validation curve of each lr. Right: final validation loss against lr (a diverged run at the top)."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for i, row in enumerate(table.itertuples()):
        c = curves[curves.run_id == row.run_id]
        left.plot(c.tokens, c.val_loss, "o-", ms=3, color=f"C{i}", label=f"lr {row.lr:g} ({row.status})")
    left.set_xlabel("training tokens")
    left.set_ylabel("validation loss (nats/token)")
    left.legend(fontsize=8)
    finite = table[table.final_val_loss < math.inf]
    right.plot(finite.lr, finite.final_val_loss, "o-", color="k")
    for lr in table.lr[table.final_val_loss == math.inf]:
        right.axvline(lr, color="r", ls=":", lw=1)
    right.set_xscale("log")
    right.set_xlabel("hidden-matrix lr")
    right.set_ylabel("final validation loss")
    optimizer = method_label(table.optimizer.iloc[0]) if len(table) else ""
    figure.suptitle(f"{optimizer}: learning-rate sweep (diverged runs: dotted red lines)", fontsize=10)
    return figure

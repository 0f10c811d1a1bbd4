"""The playground notebook in a real browser (`make e2e`): widgets that work in a kernel can still fail to render
in the page, where a frontend/extension mismatch shows the widget's text fallback (`VBox(children=...)`).

    1. start JupyterLab on 127.0.0.1 (a free port, a random token, root `notebooks/`) in its own process group;
    2. open `00_playground.ipynb` in headless Chromium (selenium) and run all its cells;
    3. check the widgets rendered: a Train button exists and no output shows a text fallback;
    4. set `steps` in the slider's readout, click Train, wait for "completed" and a redrawn plot;
    5. save a screenshot of the trained curve (`--out`), and print the run's wall time (Train clicked to
       "completed": the run's start-up and evaluations included; README promises under a minute on 2 idle
       cores at the defaults) and the whole check's.

The run is bounded by `--timeout`, and the browser, the kernels and the server are stopped in every case. JupyterLab
keeps its settings (notebook autosave off, every cell attached to the page, no news), workspace and checkpoints in
a temporary folder, so it neither writes to `notebooks/` nor reads a user's layout. `window.jupyterapp`
(`--expose-app-in-browser`) is the handle for opening the notebook and running its cells: the commands JupyterLab's
menus call. On failure the exit status is 1, the reason is one line on stderr, and the temporary folder (server
log, last screenshot) is kept for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from multinorm.paths import child_env, repo_root
from multinorm.paths import resolve as repo_path

__all__ = ["E2EError", "Deadline", "free_port", "lab_url", "lab_command", "write_lab_settings", "text_fallbacks", "Lab",
           "check_playground", "main"]

NOTEBOOK = "00_playground.ipynb"
FALLBACK_TEXTS = ("HBox(", "VBox(", "Loading widget", "Error displaying widget")
FAILED_STATUS = ("failed", "not started", "plot stopped", "interrupted")


def text_fallbacks(outputs: list[str]) -> list[str]:
    """The first line of every cell output that shows a widget's text fallback (what a frontend without the
    widget extension prints, e.g. ``VBox(children=...)``) instead of the widget."""
    return [t.strip().splitlines()[0] for t in outputs if t.strip() and any(f in t for f in FALLBACK_TEXTS)]

# JupyterLab settings for the test session, by plugin (the files of a user settings folder).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}

# The notebook the URL opened, once JupyterLab has restored it: its path, else null.
_CURRENT_PATH = """
const app = window.jupyterapp;
const widget = app && app.shell.currentWidget;
return (widget && widget.context && widget.context.path) || null;
"""

# Wait for the kernel session, collapse the file browser, run all cells (the menu's Run > Run All Cells).
_RUN_ALL = """
const done = arguments[arguments.length - 1];
(async () => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  await panel.context.ready;
  await panel.sessionContext.ready;
  app.shell.collapseLeft();
  const ok = await app.commands.execute('notebook:run-all-cells');
  done({ok: ok !== false, kernel: panel.sessionContext.kernelDisplayName});
})().catch(error => done({error: String(error)}));
"""

_OUTPUT_TEXTS = "return [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.innerText);"

_TRAIN = "//button[contains(@class, 'widget-button') and contains(normalize-space(.), 'Train')]"
_PLAYGROUND = f"(//div[contains(@class, 'widget-vbox')][.{_TRAIN}])[1]"
_STATUS = f"//div[contains(@class, 'widget-hbox')][.{_TRAIN}]//div[contains(@class, 'widget-html-content')]"
_PLOT = f"{_PLAYGROUND}//div[contains(@class, 'widget-output')]//img"


def _slider_readout(label: str) -> str:
    return (f"//div[contains(@class, 'widget-slider')][.//label[normalize-space(.)='{label}']]"
            "//div[contains(@class, 'widget-readout')]")


class E2EError(RuntimeError):
    """A failed check; its message is the one-line reason."""


class Deadline:
    """The time left of an overall budget."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def say(self, message: str) -> None:
        """A progress line on stderr, with the seconds elapsed."""
        print(f"[{time.monotonic() - self.start:5.0f} s] {message}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def lab_url(port: int, token: str, notebook: str = NOTEBOOK, host: str = "127.0.0.1") -> str:
    """The address that opens `notebook` (relative to the server's root) in JupyterLab, logged in by `token`."""
    path = urllib.parse.quote(notebook)
    return f"http://{host}:{port}/lab/tree/{path}?{urllib.parse.urlencode({'token': token})}"


def lab_command(port: int, root: Path, workdir: Path, as_root: bool) -> list[str]:
    """`jupyter lab` on 127.0.0.1:`port`, serving `root`, with its settings, workspaces and checkpoints in
    `workdir` (the token is passed in the environment, as JUPYTER_TOKEN, to keep it out of the process list)."""
    return [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={workdir / 'settings'}", f"--LabApp.workspaces_dir={workdir / 'workspaces'}",
            f"--FileCheckpoints.checkpoint_dir={workdir / 'checkpoints'}",  # absolute: not notebooks/.ipynb_checkpoints
            *(["--allow-root"] if as_root else [])]


def write_lab_settings(settings_dir: Path, settings: dict[str, dict] = LAB_SETTINGS) -> None:
    """A JupyterLab user settings folder: one `<plugin>.jupyterlab-settings` file per plugin."""
    for plugin, values in settings.items():
        path = settings_dir / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2))


class Lab:
    """A JupyterLab server in its own process group; `stop()` shuts its kernels down, then ends the group."""

    def __init__(self, root: Path, workdir: Path, as_root: bool):
        self.port, self.token = free_port(), secrets.token_hex(24)
        write_lab_settings(workdir / "settings")
        (workdir / "workspaces").mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "jupyterlab.log"
        # The kernel imports this package from this checkout, as the training subprocesses it starts do.
        env = child_env() | {"JUPYTER_TOKEN": self.token}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(lab_command(self.port, root, workdir, as_root),
                                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def url(self, notebook: str = NOTEBOOK) -> str:
        return lab_url(self.port, self.token, notebook)

    def _api(self, path: str, method: str = "GET", timeout: float = 5.0):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, deadline: Deadline) -> None:
        while deadline.left() > 0:
            if self.process.poll() is not None:
                raise E2EError(f"JupyterLab exited with status {self.process.returncode} before answering")
            try:
                self._api("status", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise E2EError("timed out waiting for JupyterLab to answer")

    def stop(self, grace_s: float = 10.0) -> None:
        """Shut the kernels down through the server (a kernel runs in a session of its own, outside the group,
        and its shutdown stops a playground run it started), then SIGTERM the group, SIGKILL after `grace_s`."""
        if self.process.poll() is None:
            try:
                for kernel in self._api("kernels"):
                    self._api(f"kernels/{kernel['id']}", method="DELETE", timeout=grace_s)
            except (OSError, ValueError):
                pass  # the server is not answering: ending its group is all that is left
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()


def _browser(chromium: str, chromedriver: str, window: tuple[int, int]):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise E2EError(f"selenium is not installed ({exc}): make setup installs it") from exc
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window[0]},{window[1]}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def _wait(driver, deadline: Deadline, what: str, condition):
    """`condition(driver)` once it is truthy; E2EError naming `what` when the deadline passes first."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, deadline.left(), poll_frequency=0.25).until(condition)
    except TimeoutException:
        raise E2EError(f"timed out waiting for {what}") from None


def _find(xpath: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def found(driver):
        try:
            elements = driver.find_elements(By.XPATH, xpath)
            return elements[0] if elements and elements[0].is_displayed() else False
        except StaleElementReferenceException:
            return False
    return found


RUN_PROMISE_S = 60.0  # the playground's default run on 2 idle CPU cores (README, notebook 00)


def check_playground(driver, url: str, steps: int, deadline: Deadline, screenshot: Path) -> tuple[str, float]:
    """Open the playground at `url`, check its widgets render, train `steps` steps, save a PNG to `screenshot`.
    Returns the status line of the finished run and its wall time in seconds, from the click on Train until
    the status line says it completed."""
    from selenium.webdriver.common.keys import Keys

    driver.set_script_timeout(max(1.0, deadline.left()))
    driver.get(url)
    _wait(driver, deadline, f"JupyterLab to open {NOTEBOOK}", lambda d: d.execute_script(_CURRENT_PATH) == NOTEBOOK)
    result = driver.execute_async_script(_RUN_ALL)
    if not result or "error" in result or not result.get("ok"):
        raise E2EError(f"running all cells failed: {result}")
    deadline.say(f"ran all cells of {NOTEBOOK} ({result.get('kernel')})")

    train = _wait(driver, deadline, "the Train button to render", _find(_TRAIN))
    fallbacks = text_fallbacks(driver.execute_script(_OUTPUT_TEXTS))
    if fallbacks:
        raise E2EError(f"a widget shows its text fallback, not the widget: {fallbacks[0][:120]}")
    deadline.say("the widgets rendered")

    readout = _wait(driver, deadline, "the steps slider", _find(_slider_readout("steps")))
    readout.click()
    readout.send_keys(Keys.CONTROL, "a")
    readout.send_keys(str(steps), Keys.ENTER)
    _wait(driver, deadline, f"the steps slider to show {steps}", lambda d: readout.text.strip() == str(steps))

    train.click()
    clicked = time.monotonic()
    deadline.say(f"Train clicked ({steps} steps)")
    status = _wait(driver, deadline, "the run to start", _find(_STATUS))
    first_plot = _wait(driver, deadline, "the loss plot", _find(_PLOT)).get_attribute("src")
    _wait(driver, deadline, "the run to finish",
          lambda d: any(word in status.text for word in ("completed", *FAILED_STATUS)))
    run_s = time.monotonic() - clicked
    line = status.text.strip()
    deadline.say(line)
    if "completed" not in line:
        raise E2EError(f"the run did not complete: {line}")
    _wait(driver, deadline, "the plot to be redrawn with the run's losses",
          lambda d: (plot := _find(_PLOT)(d)) and plot.get_attribute("src") != first_plot)

    outputs = driver.find_element("xpath", f"{_PLAYGROUND}/ancestor::div[contains(@class, 'jp-Cell-outputArea')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", outputs)
    time.sleep(0.5)  # let the scroll settle before the screenshot
    if not driver.save_screenshot(str(screenshot)):
        raise E2EError(f"could not save a screenshot to {screenshot}")
    return line, run_s


def wall_time_line(steps: int, run_s: float, total_s: float, default_steps: int) -> str:
    """The report of a passed check: the run's wall time, measured against the promise at the defaults."""
    line = f"playground run: {run_s:.0f} s for {steps} steps (Train to completed); whole check {total_s:.0f} s"
    if steps == default_steps:
        verdict = "within" if run_s <= RUN_PROMISE_S else "over"
        line += f"; {verdict} the {RUN_PROMISE_S:.0f} s promised for the default run on 2 idle cores"
    return line


def trained_steps(status_line: str, runs_dir: str | Path | None = None) -> int | None:
    """The last step recorded by the run a playground status line names ("completed: ... (<run id>)"), read from
    its metrics.jsonl under `runs_dir` (default: the playground's); None if the line names no run with a record."""
    if runs_dir is None:
        from multinorm.studies.playground import RUNS_DIR as runs_dir
    if not status_line.endswith(")"):
        return None
    path = repo_path(runs_dir) / status_line.rsplit("(", 1)[-1][:-1] / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return rows[-1]["step"] if rows else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multinorm.studies.e2e", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="figures/playground.png",
                        help="screenshot of the trained run (relative: under the repository root)")
    parser.add_argument("--steps", type=int, default=16, help="steps of the run the Train button starts")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole check, start-up included")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="the browser binary")
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver") or "chromedriver",
                        help="the WebDriver binary matching --chromium")
    parser.add_argument("--window-size", default="1400x1000", help="browser window, WIDTHxHEIGHT pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.timeout)
    notebooks = repo_root() / "notebooks"
    out = repo_path(args.out)
    width, height = (int(v) for v in args.window_size.lower().split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="multinorm-e2e-"))
    before = (notebooks / NOTEBOOK).read_bytes()
    lab = driver = None
    try:
        for binary in (args.chromium, args.chromedriver):
            if shutil.which(binary) is None:
                raise E2EError(f"{binary} not found: install chromium and chromium-driver (make e2e does)")
        lab = Lab(notebooks, workdir, as_root=os.geteuid() == 0)
        lab.wait_ready(deadline)
        deadline.say(f"JupyterLab answering on port {lab.port}")
        driver = _browser(args.chromium, args.chromedriver, (width, height))
        line, run_s = check_playground(driver, lab.url(), args.steps, deadline, workdir / "playground.png")
        if trained_steps(line) != args.steps:
            raise E2EError(f"the run did not train the {args.steps} steps set in the slider: {line}")
        if (notebooks / NOTEBOOK).read_bytes() != before:
            raise E2EError(f"the browser session changed notebooks/{NOTEBOOK}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "playground.png", out)
    except Exception as exc:
        if driver is not None:
            try:
                driver.save_screenshot(str(workdir / "failure.png"))
            except Exception:
                pass
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, E2EError):
            reason = f"{type(exc).__name__}: {reason}"
        print(f"e2e failed: {reason} (server log and screenshot in {workdir})", file=sys.stderr)
        return 1
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:
                pass
        if lab is not None:
            lab.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    from multinorm.studies.playground import Settings

    report = wall_time_line(args.steps, run_s, time.monotonic() - deadline.start, Settings().steps)
    print(f"e2e passed: {line}\n{report}\nscreenshot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

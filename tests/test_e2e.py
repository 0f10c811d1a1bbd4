"""`make e2e`'s helpers (the browser check itself needs Chromium and is not part of make test)."""

import json
import socket
import sys
import urllib.parse

from multinorm.studies.e2e import (free_port, lab_command, lab_url, text_fallbacks, trained_steps, wall_time_line,
                                   write_lab_settings)


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_lab_url_opens_the_notebook_with_the_token():
    url = urllib.parse.urlsplit(lab_url(8890, "a+b", "00 playground.ipynb"))
    assert (url.scheme, url.netloc, url.path) == ("http", "127.0.0.1:8890", "/lab/tree/00%20playground.ipynb")
    assert urllib.parse.parse_qs(url.query) == {"token": ["a+b"]}


def test_lab_command_is_local_headless_and_root_only_when_asked(tmp_path):
    command = lab_command(8890, tmp_path / "notebooks", tmp_path, as_root=False)
    assert command[:4] == [sys.executable, "-m", "jupyter", "lab"]
    assert {"--no-browser", "--ip=127.0.0.1", "--port=8890", f"--ServerApp.root_dir={tmp_path / 'notebooks'}",
            f"--FileCheckpoints.checkpoint_dir={tmp_path / 'checkpoints'}"} <= set(command)
    assert "--allow-root" not in command
    assert "--allow-root" in lab_command(8890, tmp_path / "notebooks", tmp_path, as_root=True)
    assert not any("token" in arg.lower() for arg in command)  # passed in the environment


def test_lab_settings_turn_autosave_off(tmp_path):
    write_lab_settings(tmp_path)
    path = tmp_path / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings"
    assert json.loads(path.read_text()) == {"autosave": False}


def test_trained_steps_reads_the_run_the_status_line_names(tmp_path):
    run = tmp_path / "sinkgd-lr0.00025-seed0-abc"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 8}\n{"step": 16}\n')
    line = "completed: final validation loss 6.05 (ppl 423.6), 1,015 tokens/s, 64 s of training "
    assert trained_steps(line + f"({run.name})", tmp_path) == 16
    assert trained_steps(line + "(another-run)", tmp_path) is None
    assert trained_steps("failed (exit code 1): ...", tmp_path) is None


def test_a_widget_shown_as_its_text_fallback_is_caught():
    outputs = ["Train", "VBox(children=(IntSlider(value=64), Button(description='Train')))\nmore",
               "", "Loading widget...", "validation loss 6.05"]
    assert text_fallbacks(outputs) == ["VBox(children=(IntSlider(value=64), Button(description='Train')))",
                                       "Loading widget..."]
    assert text_fallbacks(["Train", "a rendered plot"]) == []




def test_wall_time_line_judges_the_default_run_against_the_promise():
    assert wall_time_line(64, 31.4, 52.0, 64) == ("playground run: 31 s for 64 steps (Train to completed); whole check "
                                                 "52 s; within the 60 s promised for the default run on 2 idle cores")
    assert wall_time_line(64, 121.0, 150.0, 64).endswith("over the 60 s promised for the default run on 2 idle cores")
    assert wall_time_line(16, 10.0, 30.0, 64).endswith("whole check 30 s")  # not the default run: no verdict

"""Shared fixtures."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: each gets its share of threads, for torch in this process
    and (through OMP_NUM_THREADS) for the training subprocesses and notebook kernels it starts."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable order otherwise): under pytest-xdist the minute-long ones start early and the
    short ones fill the gaps, so no worker finishes the run alone on a long test while the others idle."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "smoke" not in item.name))  # longest first


@pytest.fixture(scope="session", autouse=True)
def offline():
    """Hugging Face offline mode for the whole run, restored afterwards.

    Every test reads local files or the wiki-sample cache, so a hub request can
    only be a bug (or a hang on a machine without network); offline mode turns it
    into an immediate error. The variables reach `datasets` (imported later) and
    subprocesses; huggingface_hub reads its variable once, when transformers
    imports it during collection, so its constant is patched as well.
    """
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:  # imported before this fixture ran
            mp.setattr(datasets_config, "HF_HUB_OFFLINE", True)
            mp.setattr(datasets_config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def data_cache_root():
    """The wiki-sample cache (``$MULTINORM_DATA`` or ``<repo>/data``), built once per test run.

    The root is exported as ``MULTINORM_DATA`` for the rest of the session, so
    code that uses the default cache (the trainer, notebooks, CLI subprocesses)
    reads this same corpus instead of building its own.
    """
    from multinorm.data import build_wiki_sample

    root = Path(os.environ.get("MULTINORM_DATA", REPO / "data")).resolve()
    build_wiki_sample(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MULTINORM_DATA", str(root))
        yield root


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: the operators are memory bound, and one thread is faster and
    steadier than two on a small shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def signal_at(monkeypatch):
    """``signal_at(step, signum=SIGTERM, nth_load=1)``: deliver a real ``signum`` to this process when the trainer
    asks the ``nth_load``-th dataset it loads for training batch ``step``; returns the list of loaded datasets.
    Runs are interrupted the way users interrupt them, without a hook in the trainer."""
    import signal

    import multinorm.train.loop as train_module

    def arm(step, signum=signal.SIGTERM, nth_load=1):
        real_load = train_module.load_data
        loads = []

        def load_data(*args, **kwargs):
            data = real_load(*args, **kwargs)
            loads.append(data)
            if len(loads) == nth_load:
                real_batch = data.train_batch

                def train_batch(i, batch_size, **kwargs):
                    if i == step:
                        signal.raise_signal(signum)
                    return real_batch(i, batch_size, **kwargs)

                data.train_batch = train_batch
            return data

        monkeypatch.setattr(train_module, "load_data", load_data)
        return loads

    return arm

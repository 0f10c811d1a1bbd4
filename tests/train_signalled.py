"""`python -m multinorm.train` with SIGTERM raised on one rank while it reads a given training batch.

Used under torchrun by tests/test_parallel_train.py: ``SIGNAL_RANK`` and ``SIGNAL_AT_STEP`` say which
rank gets the signal and when; the other ranks get none, so the run stops only if the ranks agree to.
"""

import os
import signal
import sys

import multinorm.train.loop as train_module
from multinorm.train import main

RANK, STEP = os.environ["SIGNAL_RANK"], int(os.environ["SIGNAL_AT_STEP"])
real_load = train_module.load_data


def load_data(*args, **kwargs):
    data = real_load(*args, **kwargs)
    real_batch = data.train_batch

    def train_batch(step, batch_size, **kwargs):
        if step == STEP and os.environ.get("RANK", "0") == RANK:
            signal.raise_signal(signal.SIGTERM)
        return real_batch(step, batch_size, **kwargs)

    data.train_batch = train_batch
    return data


train_module.load_data = load_data
sys.exit(main(sys.argv[1:]))

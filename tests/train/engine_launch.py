"""What ``torchrun`` runs in tests/test_engine.py: the CLI, optionally SIGKILLed (no clean-up, no atexit)
after HEDGEHOG_KILL_AFTER stage 2 optimizer steps on every rank."""
import os
import signal
import sys

from hedgehog.cli import main
from hedgehog.train.engine import Engine

kill_after, real, done = int(os.environ.get("HEDGEHOG_KILL_AFTER", "0")), Engine.step, [0]


def step_then_maybe_die(*a, **kw):
    real(*a, **kw)
    done[0] += not kw.get("sync")  # stage 1's steps average the maps' gradients by hand (sync=True)
    if done[0] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


if kill_after:
    Engine.step = step_then_maybe_die
sys.exit(main(sys.argv[1:]))

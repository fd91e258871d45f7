"""Fault hooks that run *inside* Ray worker processes, installed from outside the library.

**Decoder faults** (``runtime_env["worker_process_setup_hook"]``): ``install_poison_decoder``
wraps ``mlc_ray.data.images.decode_image`` so that bytes carrying ``POISON_MARKER`` crash the process with SIGSEGV, as a decoder bug in a C library would, and bytes
carrying ``HANG_MARKER`` never return (a decoder stuck in a loop). Every other input decodes as
usual, so the hook is inert for the rest of the tier. Each crash or hang appends a line
(``crash <pid>`` / ``hang <pid>``) to the file named by ``CRASH_LOG_ENV`` first, so a test can count
the attempts.

**Predictor faults** (monkeypatching in the driver): ``install_predictor_faults`` replaces the
``Predictor`` class that tagging's Ray Data stage (``mlc_ray.tagging.dataset``) maps with, in the
driver process only, by ``faulty_predictor``: a subclass made inside a function, so cloudpickle
ships it to the actors *by value* (with its settings) and the workers need no test code on their
path. It keeps the name ``Predictor`` (the actor title ``MapBatches(Predictor)`` the tests look
for). ``delay_s``: each call sleeps first (a run that outlives the kills); ``exit_once_marker``: the
first call anywhere creates that file and exits its process (a crashed actor, once).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

POISON_MARKER = b"MLC-RAY-CHAOS-POISON"
HANG_MARKER = b"MLC-RAY-CHAOS-HANG"
CRASH_LOG_ENV = "MLC_RAY_CHAOS_CRASH_LOG"


def install_poison_decoder() -> None:
    from mlc_ray.data import images

    real = images.decode_image
    if getattr(real, "_chaos_wrapped", False):
        return

    def decode_image(data, **kwargs):  # type: ignore[no-untyped-def]
        kind = None
        if data is not None and POISON_MARKER in bytes(data):
            kind = "crash"
        elif data is not None and HANG_MARKER in bytes(data):
            kind = "hang"
        if kind:
            log = os.environ.get(CRASH_LOG_ENV)
            if log:
                with open(log, "a") as fh:
                    fh.write(f"{kind} {os.getpid()}\n")
            if kind == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            while True:
                time.sleep(60)
        return real(data, **kwargs)

    decode_image._chaos_wrapped = True  # type: ignore[attr-defined]
    images.decode_image = decode_image


def faulty_predictor(*, delay_s: float = 0.0, exit_once_marker: str | None = None) -> type:
    """A ``Predictor`` subclass that sleeps ``delay_s`` per call and/or exits its process once."""
    from mlc_ray.tagging.predictor import Predictor

    delay_s = float(delay_s)
    marker = str(exit_once_marker) if exit_once_marker else None

    class FaultyPredictor(Predictor):
        def __call__(self, batch: Any) -> Any:
            if marker and not os.path.exists(marker):
                with open(marker, "w") as fh:
                    fh.write(str(os.getpid()))
                os._exit(1)  # a crashed actor: Ray restarts it and retries the task
            if delay_s:
                time.sleep(delay_s)
            return super().__call__(batch)

    FaultyPredictor.__name__ = "Predictor"  # Ray Data names the stage (and the actor process) by it
    return FaultyPredictor


def install_predictor_faults(monkeypatch: Any = None, **faults: Any) -> type:
    """Make this process's tagging runs map with ``faulty_predictor(**faults)``; with a pytest
    ``monkeypatch`` the swap is undone after the test (a driver process keeps it)."""
    from mlc_ray.tagging import dataset as tag_dataset

    cls = faulty_predictor(**faults)
    if monkeypatch is not None:
        monkeypatch.setattr(tag_dataset, "Predictor", cls)
    else:
        tag_dataset.Predictor = cls
    return cls

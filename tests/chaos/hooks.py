"""Fault hooks that run *inside* Ray worker processes (``runtime_env["worker_process_setup_hook"]``).

``install_poison_decoder`` wraps ``mlc_ray.data.images.decode_image`` so that bytes carrying
``POISON_MARKER`` crash the process with SIGSEGV, as a decoder bug in a C library would, and bytes
carrying ``HANG_MARKER`` never return (a decoder stuck in a loop). Every other input decodes as
usual, so the hook is inert for the rest of the tier. Each crash or hang appends a line
(``crash <pid>`` / ``hang <pid>``) to the file named by ``CRASH_LOG_ENV`` first, so a test can count
the attempts.
"""

from __future__ import annotations

import os
import signal
import time

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

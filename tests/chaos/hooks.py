"""Fault hooks that run *inside* Ray worker processes (``runtime_env["worker_process_setup_hook"]``).

``install_poison_decoder`` wraps ``mlc_ray.data.images.decode_image`` so that bytes carrying
``POISON_MARKER`` crash the process with SIGSEGV, as a decoder bug in a C library would. Every
other input decodes as usual, so the hook is inert for the rest of the tier. Each crash appends the
worker's pid to the file named by ``CRASH_LOG_ENV`` first, so a test can count the attempts.
"""

from __future__ import annotations

import os
import signal

POISON_MARKER = b"MLC-RAY-CHAOS-POISON"
CRASH_LOG_ENV = "MLC_RAY_CHAOS_CRASH_LOG"


def install_poison_decoder() -> None:
    from mlc_ray.data import images

    real = images.decode_image
    if getattr(real, "_chaos_wrapped", False):
        return

    def decode_image(data, **kwargs):  # type: ignore[no-untyped-def]
        if data is not None and POISON_MARKER in bytes(data):
            log = os.environ.get(CRASH_LOG_ENV)
            if log:
                with open(log, "a") as fh:
                    fh.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(data, **kwargs)

    decode_image._chaos_wrapped = True  # type: ignore[attr-defined]
    images.decode_image = decode_image

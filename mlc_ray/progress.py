"""Logs for people: one progress line every N seconds instead of progress bars.

A scheduled job is read in ``ray job logs``, a cron mail or a CI log, where progress bars turn into
escape codes and ``\\r`` fragments. ``quiet_ray_progress()`` turns Ray Data's bars off when stderr is
not a terminal (on a terminal, one global bar stays; per-operator bars are always off), and
``ProgressLine`` logs ``tagging: 1200/5000 images (24%), 35.2 images/s, ETA 1m48s, 3 errors`` at
most every ``every_s`` seconds. ``format_eta`` is shared with training's per-epoch line.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["ProgressLine", "format_eta", "quiet_ray_progress", "plain_console", "is_terminal"]

log = logging.getLogger("mlc_ray.progress")


def is_terminal() -> bool:
    """True when stderr (where the logs go) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_eta(seconds: float | None) -> str:
    """``95`` -> ``1m35s``, ``7300`` -> ``2h01m``; None or inf -> ``?``."""
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def quiet_ray_progress() -> None:
    """Ray Data's progress bars off unless stderr is a terminal; per-operator bars always off (one
    line per refresh per operator is what made logs unreadable). Call in the driver before a
    dataset executes."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    tty = is_terminal()
    ctx.enable_progress_bars = tty
    ctx.enable_operator_progress_bars = False
    if hasattr(ctx, "enable_rich_progress_bars"):
        ctx.enable_rich_progress_bars = False
    # the execution plan and per-operator summaries go to Ray Data's own log file, not the console
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    if hasattr(ctx, "verbose_stats_logs"):
        ctx.verbose_stats_logs = False


class ProgressLine:
    """Counts done/total and errors; ``update`` logs one line when ``every_s`` has passed."""

    def __init__(self, what: str, total: int, every_s: float = 30.0, *, unit: str = "images") -> None:
        self.what, self.total, self.every_s, self.unit = what, int(total), float(every_s), unit
        self.done = 0
        self.errors = 0
        self.t0 = time.monotonic()
        self._last = self.t0
        self.lines = 0

    def update(self, done: int = 0, errors: int = 0) -> None:
        self.done += int(done)
        self.errors += int(errors)
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.log()

    def line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.t0)
        rate = self.done / elapsed
        left = max(0, self.total - self.done)
        eta = left / rate if rate > 0 else None
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s, "
            f"ETA {format_eta(eta if left else 0.0)}, {self.errors} errors"
        )

    def log(self) -> None:
        self.lines += 1
        log.info("%s", self.line())


def plain_console() -> None:
    """No colour codes from Ray when stderr is not a terminal: its worker-log prefixes
    (``RAY_COLOR_PREFIX=0``, Ray's documented switch) and the coloured dashboard URL that
    ``ray.init`` logs (colorama's constants, emptied). Call before ``ray.init``."""
    import os

    if is_terminal():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        import colorama
    except ImportError:
        return
    for palette in (colorama.Fore, colorama.Back, colorama.Style):
        for name in dir(palette):
            if name.isupper():
                setattr(palette, name, "")

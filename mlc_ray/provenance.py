"""Where a result came from: the code's git commit and the command line that produced it.

Training tags its MLflow run with both, and registration tags the model version with the commit
(the recipe log: every figure and every model traceable to a command and a commit).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["command_line", "git_commit"]

_CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding the mlc_ray package


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from (``-dirty`` if tracked files changed), else None.

    None outside a git checkout (an installed wheel, a cluster image without .git) or without git.
    """
    try:
        sha = subprocess.run(
            ["git", "-C", str(_CHECKOUT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def command_line(*, full_executable: bool = False) -> str:
    """This process's command line: ``python jobs/train.py --epochs 3``.

    ``full_executable`` gives the interpreter's full path and shell quoting (what a registered model
    version records, so the command can be pasted back into a shell on the same machine).
    """
    if full_executable:
        return shlex.join([sys.executable, *sys.argv])
    return " ".join([os.path.basename(sys.executable), *sys.argv])

"""A job's process ends with its exit code after everything ``sys.exit`` would have finished.

``cli.exit_process`` (every ``jobs/*.py`` ``__main__``) skips only the interpreter's module teardown:
non-daemon threads are joined (after threading's exit hooks stopped idle ``concurrent.futures``
workers, as the interpreter does), ``atexit`` handlers run, stdout/stderr and log handlers are flushed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SCRIPT = """
import atexit, logging, sys, threading, time
from pathlib import Path
from mlc_ray.cli import exit_process

out = Path(sys.argv[1])
logging.basicConfig(stream=open(out / "log.txt", "w"), level=logging.INFO)  # buffered file handler
logging.getLogger("job").info("logged before exit")
atexit.register(lambda: (out / "atexit.txt").write_text("ran"))

def late():
    time.sleep(0.5)
    (out / "thread.txt").write_text("finished")

threading.Thread(target=late).start()  # non-daemon: must finish before the process ends
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # an idle worker left running (an HTTP client's pool): must not hang the exit
pool.submit(lambda: None).result()
sys.stdout.write("summary without a newline or a flush")
exit_process(3)
"""


def test_exit_code_output_threads_atexit_and_logs_all_survive(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "summary without a newline or a flush"
    assert (tmp_path / "thread.txt").read_text() == "finished"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "logged before exit" in (tmp_path / "log.txt").read_text()


def test_every_job_ends_through_exit_process() -> None:
    for script in sorted((REPO_ROOT / "jobs").glob("*.py")):
        text = script.read_text()
        if '__name__ == "__main__"' in text:
            assert "exit_process(main())" in text, f"{script.name} ends with plain sys.exit"

"""Run a job (``jobs/tag.py`` by default) as a driver process on an existing Ray cluster,
optionally killing itself.

    python -m tests.chaos.driver --ray-address HOST:PORT [--job tag|train|...] [--worker-env K=V ...]
        [--kill-at POINT:N] [--read-block-keys N] [--preserve-order] [--predictor-delay-s S]
        -- <the job's arguments>

The driver connects to the cluster the test started (a separate Ray job, as ``ray job submit``
would run it), with ``--worker-env`` as its job's worker environment, then calls
``jobs/<job>.py``'s ``main``. ``--predictor-delay-s``: each Predictor call sleeps first
(``hooks.install_predictor_faults``). Tagging only: ``--kill-at`` SIGKILLs the driver at an exact point
of the run, with no timing involved:

* ``listing:N``    — right after the N-th shard descriptor is stored (the listing is unfinished);
* ``mid-shard:N``  — once this attempt has committed N shards, right after the next batch of rows
  that leaves its shard *incomplete* reaches the driver (rows buffered, the shard not committed);
* ``commit:N``     — during the N-th commit on S3: the temp object is uploaded, the copy to the
  final name has not happened (the driver dies inside ``storage.upload_file``);
* ``after-commit:N`` — right after the N-th commit returned, before its counts file is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys

from tests.helpers import REPO_ROOT

KILL_POINTS = ("listing", "mid-shard", "commit", "after-commit")


def _die(point: str) -> None:
    sys.stderr.write(f"chaos driver: SIGKILL at {point}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(point: str, n: int) -> None:
    """Monkeypatch the library so this process SIGKILLs itself at ``point`` the ``n``-th time."""
    from mlc_ray import storage
    from mlc_ray.tagging import commit as commit_stage
    from mlc_ray.tagging import inputs, table

    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    if point == "listing":
        real_put = inputs.ShardStore.put

        def put(self, shard):  # type: ignore[no-untyped-def]
            real_put(self, shard)
            if hit():
                _die(f"listing (after shard descriptor {shard.index})")

        inputs.ShardStore.put = put
    elif point == "mid-shard":
        real_add = commit_stage.ShardBuffer.add
        real_commit = table.TagTableWriter.commit
        committed = {"n": 0}

        def counting_commit(self, tbl, shard_index, digest):  # type: ignore[no-untyped-def]
            uri = real_commit(self, tbl, shard_index, digest)
            committed["n"] += 1
            return uri

        def add(self, part):  # type: ignore[no-untyped-def]
            result = real_add(self, part)
            if not self.complete and committed["n"] >= n:
                _die(
                    f"mid-shard (shard {self.shard.index}: {int(self.seen.sum())}/{len(self.shard)} rows in, "
                    f"{committed['n']} shard(s) committed)"
                )
            return result

        commit_stage.ShardBuffer.add = add
        table.TagTableWriter.commit = counting_commit
    elif point == "commit":
        real_client = storage.s3_client

        def s3_client(*args, **kwargs):  # type: ignore[no-untyped-def]
            client = real_client(*args, **kwargs)
            if not getattr(client, "_chaos_copy", False):
                real_copy = client.copy

                def copy(source, bucket, key, *args, **kwargs):  # type: ignore[no-untyped-def]
                    if "/dt=" in "/" + key and hit():
                        _die(f"commit (temp object {source['Key']} uploaded, not copied to {key})")
                    return real_copy(source, bucket, key, *args, **kwargs)

                client.copy = copy
                client._chaos_copy = True
            return client

        storage.s3_client = s3_client
    elif point == "after-commit":
        real_commit = table.TagTableWriter.commit

        def commit(self, tbl, shard_index, digest):  # type: ignore[no-untyped-def]
            uri = real_commit(self, tbl, shard_index, digest)
            if hit():
                _die(f"after-commit (shard {shard_index} committed, counts not written)")
            return uri

        table.TagTableWriter.commit = commit
    else:
        raise SystemExit(f"--kill-at: unknown point {point!r}; use one of {KILL_POINTS}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, job_args = argv[:split], argv[split + 1 :]
    else:
        own, job_args = argv, []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ray-address", required=True)
    p.add_argument("--job", default="tag", help="jobs/<JOB>.py to run (default tag)")
    p.add_argument("--worker-env", action="append", default=[], metavar="K=V")
    p.add_argument("--kill-at", help="POINT:N, POINT one of " + ", ".join(KILL_POINTS))
    p.add_argument(
        "--read-block-keys",
        type=int,
        help="keys per read task (smaller than a shard: a shard arrives in parts)",
    )
    p.add_argument(
        "--preserve-order",
        action="store_true",
        help="Ray Data delivers rows in input order (kill points land on the same shard every run)",
    )
    p.add_argument("--predictor-delay-s", type=float, default=0.0, help="each Predictor call sleeps S s")
    args = p.parse_args(own)

    import ray

    env = {"PYTHONPATH": str(REPO_ROOT)}
    env.update(item.split("=", 1) for item in args.worker_env)
    ray.init(address=args.ray_address, runtime_env={"env_vars": env}, log_to_driver=False)
    if args.preserve_order:
        import ray.data

        ray.data.DataContext.get_current().execution_options.preserve_order = True
    if args.read_block_keys:
        from mlc_ray.tagging import dataset as tag_dataset

        tag_dataset.READ_BLOCK_KEYS = args.read_block_keys
    if args.predictor_delay_s:
        from tests.chaos.hooks import install_predictor_faults

        install_predictor_faults(delay_s=args.predictor_delay_s)
    if args.kill_at:
        point, _, n = args.kill_at.partition(":")
        install_kill(point, int(n or 1))
    spec = importlib.util.spec_from_file_location(f"{args.job}_job", REPO_ROOT / "jobs" / f"{args.job}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main(job_args)


if __name__ == "__main__":
    raise SystemExit(main())

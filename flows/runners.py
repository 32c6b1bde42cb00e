"""The task runner a config asks for: processes or threads on one machine, Dask beyond it."""

from __future__ import annotations

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from tasks.config import IngestSection


def make_task_runner(ingest: IngestSection) -> TaskRunner:
    if ingest.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=ingest.workers)
    if ingest.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=ingest.workers)
    from prefect_dask import DaskTaskRunner  # imported here: dask is only needed when asked for

    if ingest.dask_address:
        return DaskTaskRunner(address=ingest.dask_address)
    # A LocalCluster on loopback only: its dashboard would otherwise listen on 0.0.0.0:8787.
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": ingest.workers, "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
    })

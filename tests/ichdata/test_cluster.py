"""The local cluster a conversion runs on keeps no record of the tasks it sent (flat driver memory)."""

from __future__ import annotations

from typing import Any

import dask

from ichdata.cluster import dask_client


def test_the_cluster_keeps_no_log_of_the_task_batches_it_sent() -> None:
    """Only a few of the message batches distributed keeps for debugging, and its scheduler's transitions.

    Each batch holds its tasks' arguments: with distributed's default (1,000 batches) the driver's memory
    grew with every shard task until that cap.
    """
    with dask_client(1) as client:
        assert dask.config.get("distributed.admin.low-level-log-length") <= 16
        for _ in range(40):  # one batch each: one in flight at a time
            assert client.submit(len, ["ID_0123456789.dcm"] * 1_000, pure=False).result() == 1_000
        scheduler: Any = client.cluster.scheduler  # type: ignore[union-attr]
        logs = [client.scheduler_comm.recent_message_log]  # type: ignore[union-attr]
        logs += [bs.recent_message_log for bs in scheduler.stream_comms.values()]
        assert len(logs) == 2
        assert all(len(log) <= 16 for log in logs)
        assert len(scheduler.transition_log) <= 16
    assert dask.config.get("distributed.admin.low-level-log-length") == 1_000  # restored after

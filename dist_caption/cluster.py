"""A training process's place in its cluster: the exit codes it speaks and the ready file.

Pure (no TensorFlow): the trainer, the extraction, the launcher and the pod manifests agree on
these.

Exit codes of a training worker:
    0    training finished
    2    bad flags or input (one `error:` line)
    42   PREEMPTED: SIGTERM, then checkpointed with every peer; relaunch the group to resume
    43   PEER_LOST: a collective or the coordination service failed because another worker
         died, stalled or lost its link; this worker's own state is fine, and the group
         resumes from the last checkpoint when restarted (the launcher's --max_restarts, a
         JobSet's failurePolicy.maxRestarts)
    else a failure of this worker itself (1 for an error, 128+N for signal N)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

from dist_caption.errors import UserError

PREEMPTED = 42
PEER_LOST = 43
READY_FILE_ENV = "DIST_CAPTION_READY_FILE"
# The first line a worker prints when it exits PEER_LOST (its traceback follows, for the log).
PEER_LOST_LINE = "peer lost:"


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's part of a cooperative extraction: task `index` of `count` takes every
    `count`-th shard, starting at its `index`; task 0 also prepares the cache and merges it."""

    index: int = 0
    count: int = 1


def task_of(env: Mapping[str, str], task_index: int | None = None,
            num_tasks: int | None = None) -> Task:
    """This process's extraction task: from the flags if given, else TF_CONFIG, else
    JOB_COMPLETION_INDEX with DIST_CAPTION_WORKERS, else the only task."""
    if task_index is not None or num_tasks is not None:
        task = Task(task_index or 0, num_tasks or 1)
        source = "--task_index/--num_tasks"
    elif env.get("TF_CONFIG"):
        config = json.loads(env["TF_CONFIG"])
        cluster, me = config.get("cluster", {}), config.get("task", {})
        order = [kind for kind in ("chief", "worker") if kind in cluster]
        if me.get("type") not in order:
            raise UserError(f"TF_CONFIG task type {me.get('type')!r} extracts nothing: run "
                            "extraction on the chief and workers only, or pass --task_index")
        offset = sum(len(cluster[k]) for k in order[:order.index(me["type"])])
        task = Task(offset + int(me.get("index", 0)),
                          sum(len(cluster[k]) for k in order))
        source = "TF_CONFIG"
    elif env.get("JOB_COMPLETION_INDEX"):
        if not env.get("DIST_CAPTION_WORKERS", "").isdigit():
            raise UserError("JOB_COMPLETION_INDEX is set but DIST_CAPTION_WORKERS (the Job's "
                            "completions) is not: set it, or pass --num_tasks")
        task = Task(int(env["JOB_COMPLETION_INDEX"]), int(env["DIST_CAPTION_WORKERS"]))
        source = "JOB_COMPLETION_INDEX/DIST_CAPTION_WORKERS"
    else:
        return Task()
    if not 0 <= task.index < task.count:
        raise UserError(f"extraction task {task.index} of {task.count} (from {source}): the "
                        "index must be below the number of tasks; make them agree")
    return task

"""A process's place in its cluster, and what it tells the others: "who am I" for the trainer,
the extraction, the launcher and the pod entrypoint, from TF_CONFIG, or a Kubernetes Indexed
Job's JOB_COMPLETION_INDEX with DIST_CAPTION_*; the exit codes a worker speaks; the ready file.

    python -m dist_caption.cluster index     # this process's task index (the pod entrypoint)

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
import string
import sys
from typing import Mapping, Sequence

from dist_caption.errors import UserError

PREEMPTED = 42
PEER_LOST = 43
READY_FILE_ENV = "DIST_CAPTION_READY_FILE"
DEFAULT_HOST_PATTERN = "{job}-{index}.{service}:{port}"
DEFAULT_POD_PORT = "2222"
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
        return Task(*job_index(env))
    else:
        return Task()
    if not 0 <= task.index < task.count:
        raise UserError(f"extraction task {task.index} of {task.count} (from {source}): the "
                        "index must be below the number of tasks; make them agree")
    return task


def tf_config_tasks(env) -> int:
    """How many tasks the TF_CONFIG in `env` names (0 without one)."""
    tf_config = json.loads(env.get("TF_CONFIG", "{}") or "{}")
    return sum(len(v) for v in tf_config.get("cluster", {}).values())


def tf_config(hosts: Sequence[str], index: int) -> dict:
    """TF_CONFIG of worker `index` in a cluster of one worker per "host:port" of `hosts`."""
    return {"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": index}}


def local_tf_config(ports: Sequence[int], index: int) -> dict:
    """TF_CONFIG of local worker `index` in a cluster of one worker per port."""
    return tf_config([f"localhost:{p}" for p in ports], index)


def _env_int(env: Mapping[str, str], name: str, minimum: int, what: str) -> int:
    value = env.get(name)
    if value is None:
        raise UserError(f"{name} is not set: {what}")
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise UserError(f"{name}={value!r} must be an integer >= {minimum}: {what}")
    return number


def job_index(env: Mapping[str, str]) -> tuple[int, int]:
    """(this pod's index, the worker count) in a Kubernetes Indexed Job: JOB_COMPLETION_INDEX
    (set by Kubernetes) and DIST_CAPTION_WORKERS (the Job's completions), checked."""
    index = _env_int(env, "JOB_COMPLETION_INDEX", 0,
                     "run the pod in an Indexed Job (completionMode: Indexed)")
    workers = _env_int(env, "DIST_CAPTION_WORKERS", 1,
                       "set it to the Job's parallelism and completions")
    if index >= workers:
        raise UserError(f"JOB_COMPLETION_INDEX={index} is not below "
                        f"DIST_CAPTION_WORKERS={workers}: make them agree")
    return index, workers


def pod_tf_config(env: Mapping[str, str]) -> dict:
    """TF_CONFIG of the worker in this pod of a Kubernetes Indexed Job, from its environment.

    The index is `JOB_COMPLETION_INDEX` (set by Kubernetes), the worker count
    `DIST_CAPTION_WORKERS`; worker i's address is `DIST_CAPTION_WORKER_HOST_PATTERN` with
    {index}=i, {job}=`DIST_CAPTION_JOB_NAME`, {service}=`DIST_CAPTION_SERVICE` and
    {port}=`DIST_CAPTION_PORT` (2222), by default `{job}-{index}.{service}:{port}`: the pod's
    DNS name under a headless service. Raises `UserError` on missing or invalid values.
    """
    index, workers = job_index(env)
    pattern = env.get("DIST_CAPTION_WORKER_HOST_PATTERN") or DEFAULT_HOST_PATTERN
    values = {"job": env.get("DIST_CAPTION_JOB_NAME"), "service": env.get("DIST_CAPTION_SERVICE"),
              "port": env.get("DIST_CAPTION_PORT") or DEFAULT_POD_PORT}
    if not values["port"].isdigit() or not 0 < int(values["port"]) < 65536:
        raise UserError(f"DIST_CAPTION_PORT={values['port']!r} is not a port number")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as e:
        raise UserError(f"DIST_CAPTION_WORKER_HOST_PATTERN={pattern!r}: {e}") from None
    unknown = fields - {"index", *values}
    if unknown or "index" not in fields:
        raise UserError(f"DIST_CAPTION_WORKER_HOST_PATTERN={pattern!r} must contain {{index}} "
                        f"and only {{job}}, {{service}}, {{port}} besides")
    for name, env_name in (("job", "DIST_CAPTION_JOB_NAME"), ("service", "DIST_CAPTION_SERVICE")):
        if name in fields and not values[name]:
            raise UserError(f"{env_name} is not set, and the worker host pattern {pattern!r} "
                            f"needs it")
    return tf_config([pattern.format(index=i, **values) for i in range(workers)], index)


def task_index(env: Mapping[str, str]) -> int:
    """This process's task index: TF_CONFIG's (chief first, then the workers), else
    JOB_COMPLETION_INDEX's (with DIST_CAPTION_WORKERS), else 0."""
    return task_of(env).index


if __name__ == "__main__":
    import os

    if sys.argv[1:] != ["index"]:
        print("error: usage: python -m dist_caption.cluster index", file=sys.stderr)
        sys.exit(2)
    try:
        print(task_index(os.environ))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

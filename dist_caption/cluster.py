"""A training process's place in its cluster: the exit codes it speaks and the ready file.

Pure (no TensorFlow): the trainer, the launcher and the pod manifests agree on these.

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

PREEMPTED = 42
PEER_LOST = 43
READY_FILE_ENV = "DIST_CAPTION_READY_FILE"
# The first line a worker prints when it exits PEER_LOST (its traceback follows, for the log).
PEER_LOST_LINE = "peer lost:"

"""Exit codes of a trainer worker. Distinct so that torchrun logs and SkyPilot's
`recover_on_exit_codes` can tell the failure paths apart; none collides with 128+signal."""

OK = 0
BAD_CONFIG = 2
"""The configuration cannot run; restarting will not help."""
COLLECTIVE_TIMEOUT = 75
"""A collective or a whole step exceeded its timeout (a hung or vanished peer); restart."""
CHECKPOINT_FAILED = 76
"""A save failed for good with checkpoint.on_failure=stop; restart resumes from the last commit."""
PREEMPTED = 77
"""This node had a preemption notice, saved, and left the job."""
JOB_ENDED = 78
"""The rendezvous was closed before this node joined and the run has no final weights: another
node ended the job (it gave up with its own exit code). Restarting this node cannot help."""

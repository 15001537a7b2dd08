"""What Ray Train does when training fails: restart from the newest checkpoint (its default
policy, `FailureConfig.max_failures` times), except when a rank met a `DamagedShard`.

A damaged shard (truncated, corrupted, fewer samples than its ledger says) gives the same error on
every read, and a restarted run reaches it again in the same place: each restart of a 12B run
spends minutes loading its checkpoint on every rank only to fail there. Such a failure ends the
run at once, with the line that tells the user how to mend the shard (`dalle validate
--drop-damaged`). Any other failure (a lost node, a store that did not answer, a killed worker)
is left to Ray Train's default policy.
"""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError

from pipeline.errors import DamagedShard

log = logging.getLogger(__name__)


def damaged_ranks(error: TrainingFailedError) -> list[int]:
    """The ranks whose failure was a damaged shard (none for a controller's error)."""
    failures = getattr(error, "worker_failures", None) or {}
    return sorted(rank for rank, failure in failures.items() if isinstance(failure, DamagedShard))


class DamagedShardsEndRun(FailurePolicy):
    """Ray Train's default policy, but a failure in which any rank met a damaged shard is not
    retried (it would fail the same way)."""

    def __init__(self, failure_config):
        super().__init__(failure_config)
        self._default = DefaultFailurePolicy(failure_config)

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        ranks = damaged_ranks(training_failed_error)
        if ranks:
            log.warning("rank %s read a damaged shard: not restarting (a restart would read it again)", ranks[0])
            return FailureDecision.RAISE
        return self._default.make_decision(training_failed_error)

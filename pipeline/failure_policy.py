"""Ray Train V2 failure policy: restart the worker group from the last checkpoint for errors that may pass
(a dead worker, a lost node), raise at once for errors that will repeat (pipeline.errors.REPEATING).

Ray Train V2 (2.60) has no public hook for this: its DefaultFailurePolicy retries every worker error up to
`FailureConfig(max_failures)`, so a config or data error cost 4 worker-group starts before the job failed with a
generic WorkerGroupError. `install()` swaps the policy factory that `TorchTrainer.fit` calls; when Ray's internals
move, it does nothing and Ray's own policy applies.
"""
from __future__ import annotations

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from pipeline.errors import repeating_error


class FailFastOnUserErrors(DefaultFailurePolicy):
    def make_decision(self, training_failed_error) -> FailureDecision:
        if repeating_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def _factory(failure_config):
    return FailFastOnUserErrors(failure_config)


def install() -> bool:
    import ray.train.v2.api.data_parallel_trainer as dpt
    if not hasattr(dpt, "create_failure_policy"):
        return False
    dpt.create_failure_policy = _factory
    return True

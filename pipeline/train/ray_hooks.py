"""Two changes to Ray Train V2 (2.60) that it has no public hook for, each undone by Ray moving its internals
(then `install` does nothing and Ray's own behaviour applies):

- Failure policy: restart the worker group from the last checkpoint for errors that may pass (a dead worker, a
  lost node), raise at once for errors that will repeat (pipeline.common.errors.REPEATING). Ray's
  DefaultFailurePolicy retries every worker error up to `FailureConfig(max_failures)`, so a config or data error
  cost 4 worker-group starts before the job failed with a generic WorkerGroupError.
- On a private embedded Ray, no placement-group cleaner. It is a detached actor that asks the State API every
  second whether the controller is alive, so that a dead controller's placement group is freed. The State API
  needs the dashboard, which an embedded Ray does not start: every query failed and logged a warning (748 lines
  in one demo) while costing CPU on a 2-core machine. An embedded Ray dies with its driver, placement groups
  and all, so there is nothing for the cleaner to do there.
"""
from __future__ import annotations

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from pipeline.common.errors import repeating_error


class FailFastOnUserErrors(DefaultFailurePolicy):
    def make_decision(self, training_failed_error) -> FailureDecision:
        if repeating_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def _factory(failure_config):
    return FailFastOnUserErrors(failure_config)


def _without_cleaner(original):
    def callbacks(self):
        return [c for c in original(self) if type(c).__name__ != "PlacementGroupCleanerCallback"]
    callbacks.ldm_ray_original = original
    return callbacks


def install(embedded: bool = False) -> bool:
    """The failure policy always; the placement-group cleaner left out when `embedded` (and put back otherwise,
    for a later run of the same process that joins a cluster)."""
    import ray.train.v2.api.data_parallel_trainer as dpt
    if not hasattr(dpt, "create_failure_policy") or not hasattr(dpt.DataParallelTrainer, "_create_default_callbacks"):
        return False
    dpt.create_failure_policy = _factory
    current = dpt.DataParallelTrainer._create_default_callbacks
    original = getattr(current, "ldm_ray_original", current)
    dpt.DataParallelTrainer._create_default_callbacks = _without_cleaner(original) if embedded else original
    return True

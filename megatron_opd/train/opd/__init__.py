"""The OPD / MOPD / GRPO stage. Its files, in the order one step runs through them: ``run.py`` (set-up,
the step loop, teardown), ``producer.py`` (when rank 0 makes each step's batch), ``step_maker.py``
(sample, score or verify, tensorize), ``engine.py`` (the rollout engine and where new weights go),
``update.py`` (the loss and optimizer steps), ``step_log.py`` (metrics, guards, the audit)."""

from megatron_opd.train.opd.run import Evaluator, run_opd

__all__ = ["Evaluator", "run_opd"]

"""The generic stages and the plumbing every stage shares.

A stage job is `run(config, inputs, outputs, **extra) -> metrics`; inputs and outputs are `{name: path}` (see
`bsq.layout`). The generic stages live here: `pretrain` (the float model every method starts from) and `evaluate`
(measures any checkpoint the same way); their specs are `bsq.methods.GENERIC_STAGES`. Each quantization method's
stages live in its package under `bsq.methods`; `bsq.methods.stage_spec(name)` gives any stage's spec, and
`spec.run_function()` its run function.

The shared plumbing, one concern per module:

- `context`: the frozen `RunContext` of one job, validated before any side effect (`open_context`);
- `lineage`: the folder lock and the MLflow run with its labels, tags and lineage (`open_run`);
- `resume`: the resume file of an interrupted job (`ResumeFile`);
- `artifacts`: checkpoints, metrics.json, history.csv and run.json (`Artifacts`);
- `skeleton`: the one training skeleton the training stages fill with a `TrainingPlan` (`run_training`);
- `measure`: the headline cost metrics.
"""

from bsq.layout import OUTPUTS, default_outputs

__all__ = ["OUTPUTS", "default_outputs"]

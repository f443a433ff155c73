"""The paper's procedure as five stages, each `run(config, inputs, outputs) -> metrics`:

pretrain (float model) -> search (BSQ, one per alpha) -> prune (final re-quantization: the scheme) ->
finetune (scheme fixed) -> evaluate. Inputs and outputs are `{name: path}`; see `bsq.layout.OUTPUTS`.
"""

from bsq.layout import OUTPUTS, default_outputs
from bsq.stages import evaluate, finetune, pretrain, prune, search

STAGE_MODULES = {
    "pretrain": pretrain,
    "search": search,
    "prune": prune,
    "finetune": finetune,
    "evaluate": evaluate,
}

__all__ = ["STAGE_MODULES", "OUTPUTS", "default_outputs"]

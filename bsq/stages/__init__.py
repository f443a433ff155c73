"""The paper's procedure as five stages, each `run(config, inputs, outputs) -> metrics`:

pretrain (float model) -> search (BSQ, one per alpha) -> prune (final re-quantization: the scheme) ->
finetune (scheme fixed) -> evaluate. Inputs and outputs are `{name: path}`; see `bsq.layout.OUTPUTS`.
Two baselines start from the same float model: `fracbits` (search, hard assignment and finetune in one run) and
`uniform` (QAT at one bit-width); `evaluate` measures all of them the same way.
"""

from bsq.layout import OUTPUTS, default_outputs
from bsq.stages import evaluate, finetune, fracbits, pretrain, prune, search, uniform

STAGE_MODULES = {
    "pretrain": pretrain,
    "search": search,
    "prune": prune,
    "finetune": finetune,
    "evaluate": evaluate,
    "fracbits": fracbits,
    "uniform": uniform,
}

__all__ = ["STAGE_MODULES", "OUTPUTS", "default_outputs"]

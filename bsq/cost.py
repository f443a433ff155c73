"""Named BitOPs conventions (torch-free): how a traced model's layers enter BitOPs, the way each source counted them.

BitOPs = 1e-9 sum_l MACs_l * w_l * a_l (G) everywhere; papers disagree on *which* bits w_l and a_l are (fracbits.md
§1.5, bsq.md §9.4): what the image counts, what an activation the model leaves unquantized counts (BSQ's plain-ReLU
stem output, the pooled features into the classifier, MobileNet's linear-bottleneck outputs), whether float layers
(BSQ's FP 1x1 shortcuts) count, and W x A or weights only. A `BitopsPolicy` names one answer to each question, so
every method's model is counted by the same rules, and a row of ours can be computed the way a published row was.

The policies count the model's own bits (they never pretend a 3-bit layer is 8-bit): the fixed 8-bit first / last
layers of FracBits and HAWQ-V3 are properties of those methods' models, which their layers report themselves. A
policy only fills in what a model does not say: the bits of activations no quantizer produced.

`bsq.metrics` traces a model into `LayerTrace`s (one probe forward); `bitops_g(traces, policy)` counts them here.
Every stage records `bitops_g` under `DEFAULT_POLICY`, `bitops_policy` (its name) and `bitops_g@<name>` for every
policy in `POLICIES` (`bsq.stages.measure.cost_metrics`); `footnote(name)` is the sentence a table prints under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "FLOAT_BITS",
    "BitopsPolicy",
    "LayerTrace",
    "POLICIES",
    "DEFAULT_POLICY",
    "policy",
    "counted_bits",
    "bitops_g",
    "bitops_keys",
    "footnote",
]

FLOAT_BITS = 32  # what an unquantized tensor costs per entry

FLOAT_INPUTS = ("float", "model")
FLOAT_LAYERS = ("count", "skip")
PRODUCTS = ("wxa", "w")


@dataclass(frozen=True)
class LayerTrace:
    """One conv / linear layer as one probe forward saw it (bsq.metrics.trace_layers)."""

    name: str
    macs: int
    w_bits: float  # the weight bits it costs (FLOAT_BITS for a float layer)
    a_bits: float | None  # bits of its input: its own quantizer's, or the ActQuant's that produced it; None = float
    quantized: bool  # a QuantizedLayer (False: a float conv / linear, e.g. BSQ's FP shortcuts)
    image_input: bool = False  # its input is the network input
    last: bool = False  # the last conv / linear to run (the classifier)
    act_quant: bool = False  # a_bits come from a model-level activation quantizer (BSQ's ReLU6 + Q, an ActQuant)


@dataclass(frozen=True)
class BitopsPolicy:
    """One BitOPs convention. Fields:

    - `image_bits`: what the network input (the first layer's input, the image) counts;
    - `fp_image_bits`: what it counts in a model with no quantized layer (the FP baseline); None: `image_bits`;
    - `float_inputs`: what an input no quantizer produced counts (the stem output of BSQ's plain-ReLU stem, pooled
      features, linear-bottleneck outputs): "float" = FLOAT_BITS (as the model runs), or "model" = the model's
      activation bits (the highest bits of its activation quantizers, `model_activation_bits`; FLOAT_BITS when it
      has none), i.e. as if it quantized that input like its other activations;
    - `last_input_bits`: what the last layer's input counts when no quantizer produced it (None: as `float_inputs`);
    - `float_layers`: "count" float conv / linear layers (32-bit weights) or "skip" them;
    - `product`: "wxa" (MACs x w x a) or "w" (MACs x w, weight-only BitOPs).
    """

    name: str
    source: str
    certainty: str
    image_bits: float = 8
    fp_image_bits: float | None = None
    float_inputs: str = "float"
    last_input_bits: float | None = None
    float_layers: str = "count"
    product: str = "wxa"

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("float_inputs", self.float_inputs, FLOAT_INPUTS),
            ("float_layers", self.float_layers, FLOAT_LAYERS),
            ("product", self.product, PRODUCTS),
        ):
            if value not in allowed:
                raise ValueError(f"BitopsPolicy.{field} must be one of {', '.join(allowed)}, got {value!r}")

    def describe(self) -> str:
        """The rules in one line (what a footnote prints)."""
        floats = "at 32 bits" if self.float_inputs == "float" else "at the model's activation bits"
        last = (
            f"; an unquantized classifier input at {self.last_input_bits:g} bits"
            if self.last_input_bits is not None
            else ""
        )
        fp = f" ({self.fp_image_bits:g} in an FP model)" if self.fp_image_bits is not None else ""
        layers = (
            "float layers (FP shortcuts) at 32-bit weights" if self.float_layers == "count" else "float layers skipped"
        )
        product = "MACs x w_bits x a_bits" if self.product == "wxa" else "MACs x w_bits (weights only)"
        return (
            f"{product}; each layer's own weight bits; image input at {self.image_bits:g} bits{fp}; "
            f"activations no quantizer produced {floats}{last}; {layers}"
        )


POLICIES: dict[str, BitopsPolicy] = {
    p.name: p
    for p in (
        BitopsPolicy(
            name="fracbits",
            source=(
                "FracBits official code (deJQK/FracBits @ 9a900bb, fracbits.md §1.5 [CODE]): MACs x b_w x b_a over "
                "every conv / linear (1x1 shortcuts included), the first conv's image input counted at 8 bits; every "
                "other input is quantized at its searched bits there"
            ),
            certainty=(
                "verified: reproduces the official targets ResNet-18 22.83 / 34.70 G, MobileNet-V2 3.32 / 5.35 G "
                "(uniform 3 / 4 bits, 8-bit first conv and FC weights). Counting an input our models leave "
                "unquantized at the model's activation bits is our extension (FracBits models have none)"
            ),
            float_inputs="model",
        ),
        BitopsPolicy(
            name="hawq-v3",
            source=(
                "HAWQ-V3 (Zhen-Dong/HAWQ bit_config.py, bit_config_resnet18_uniform4; model_zoo.md): BOPS = MACs x "
                "w_bits x a_bits (FP row = MACs x 32 x 32); quant_input 8 (image), the stem output quantized at the "
                "first block's activation bits (stage1.unit1.quant_act), identity (shortcut) convs quantized, the "
                "classifier input at 8 bits (quant_act_output); the FP row counts the image at 32 bits"
            ),
            certainty=(
                "layout verified from the repository's bit configs, the BOPS code itself not read; gives "
                "ResNet-18 FP 1857.2 G (zoo 1858), W8A8 116.1 G (116), W4A4 34.70 G where the zoo prints 34"
            ),
            fp_image_bits=FLOAT_BITS,
            float_inputs="model",
            last_input_bits=8,
        ),
        BitopsPolicy(
            name="as-run",
            source=(
                "this suite: the bits the model executes with, traced from its quantizers; the image at 8 bits "
                "(as FracBits), every activation no quantizer produced (BSQ's plain-ReLU stem output, pooled "
                "features) at 32 bits"
            ),
            certainty="exact for the model as run; no paper reports it",
        ),
    )
}

DEFAULT_POLICY = "fracbits"  # bitops_g: the convention of FracBits' targets and budgets (fracbits.md §1.5)


def policy(name: str | BitopsPolicy) -> BitopsPolicy:
    if isinstance(name, BitopsPolicy):
        return name
    if name not in POLICIES:
        raise ValueError(f"unknown BitOPs policy {name!r}; one of {', '.join(POLICIES)}")
    return POLICIES[name]


def model_activation_bits(traces: Iterable[LayerTrace]) -> float:
    """The highest bits of the model's activation quantizers (ActQuant: BSQ's ReLU6 + Q), FLOAT_BITS when it has
    none (a float model; FracBits / uniform-QAT models, whose layers quantize their own inputs and leave the rest,
    such as a float shortcut's input, float)."""
    bits = [t.a_bits for t in traces if t.act_quant and t.a_bits is not None and t.a_bits < FLOAT_BITS]
    return max(bits) if bits else float(FLOAT_BITS)


def counted_bits(traces: list[LayerTrace], rule: str | BitopsPolicy) -> dict[str, tuple[float, float] | None]:
    """{layer: (weight bits, input bits)} as `rule` counts them; None for a layer the policy does not count."""
    p = policy(rule)
    act = model_activation_bits(traces)
    fp_model = not any(t.quantized for t in traces)
    image = p.fp_image_bits if fp_model and p.fp_image_bits is not None else p.image_bits
    out: dict[str, tuple[float, float] | None] = {}
    for t in traces:
        if not t.quantized and p.float_layers == "skip":
            out[t.name] = None
            continue
        if t.a_bits is not None:
            a = float(t.a_bits)
        elif t.image_input:
            a = float(image)
        elif t.last and p.last_input_bits is not None:
            a = float(p.last_input_bits)
        else:
            a = act if p.float_inputs == "model" else float(FLOAT_BITS)
        out[t.name] = (float(t.w_bits), a)
    return out


def bitops_g(traces: list[LayerTrace], rule: str | BitopsPolicy = DEFAULT_POLICY) -> float:
    """1e-9 sum_l MACs_l w_l a_l (or MACs_l w_l, weight-only) over the layers `rule` counts."""
    p = policy(rule)
    bits = counted_bits(traces, p)
    total = 0.0
    for t in traces:
        wa = bits[t.name]
        if wa is not None:
            total += t.macs * wa[0] * (wa[1] if p.product == "wxa" else 1.0)
    return 1e-9 * total


def bitops_keys(traces: list[LayerTrace], default: str = DEFAULT_POLICY) -> dict[str, float | str]:
    """What a metrics record carries: bitops_g (under `default`), bitops_policy, and bitops_g@<name> per policy."""
    out: dict[str, float | str] = {"bitops_g": bitops_g(traces, default), "bitops_policy": default}
    out.update({f"bitops_g@{name}": bitops_g(traces, name) for name in POLICIES})
    return out


def footnote(name: str = DEFAULT_POLICY, metrics: Mapping[str, object] | None = None) -> str:
    """The table footnote of a BitOPs column counted under policy `name` (or the `bitops_policy` a record names)."""
    if metrics is not None and isinstance(metrics.get("bitops_policy"), str):
        name = str(metrics["bitops_policy"])
    p = policy(name)
    return f"BitOPs ({p.name} convention): {p.describe()}. Source: {p.source}."

"""torchvision ImageNet models (ResNet-18/50, MobileNet-V2, Inception-V3) with BSQ activation quantizers.

The paper's ImageNet code is not public (spec §8.2, P25), so this is a labelled reconstruction: every ReLU /
ReLU6 after a conv becomes `ActQuant(act_bits)` (ReLU6 clip + dynamic a-bit quantization, as the CIFAR code
does), and the stem activation follows `stem_act_bits` (None = the model's own float activation, unquantized,
like the official HEAD stem). Weights become bit planes later, with `quantize_model`. No pretrained weights
are downloaded: ImageNet runs start from a checkpoint the suite trained or one the user provides.

torchvision is imported inside the builders: importing it costs ~4.5 s (it pulls in torch._dynamo), which every
CIFAR / digits job would otherwise pay at start-up.
"""

from __future__ import annotations

from torch import nn

from bsq.quant.act import NO_QUANT_BITS, ActQuant


class ConvBnAct(nn.Module):
    """Inception's BasicConv2d with a module activation (torchvision's calls F.relu, which cannot be swapped);
    keeps the `conv`/`bn` names so torchvision state dicts load unchanged."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _act(act_bits: int | None, float_act: nn.Module) -> nn.Module:
    return float_act if act_bits is None else ActQuant(act_bits)


def _swap_activations(model: nn.Module, act_bits: int | None, stem_act_bits: int | None) -> nn.Module:
    """Replace ReLU/ReLU6 modules; the first one met (in registration order) is the stem's."""
    seen_stem = False
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.ReLU, nn.ReLU6)):
            continue
        bits = act_bits if seen_stem else stem_act_bits
        if not seen_stem and bits is None and isinstance(module, nn.ReLU6):
            bits = NO_QUANT_BITS  # keep a ReLU6 stem a ReLU6, unquantized
        seen_stem = True
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _act(bits, module))
    return model


def resnet(depth: int, num_classes: int, act_bits: int | None, stem_act_bits: int | None) -> nn.Module:
    import torchvision

    builder = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
    return _swap_activations(builder(weights=None, num_classes=num_classes), act_bits, stem_act_bits)


def mobilenet_v2(num_classes: int, act_bits: int | None, stem_act_bits: int | None) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    return _swap_activations(model, act_bits, stem_act_bits)


def inception_v3(
    num_classes: int, act_bits: int | None, stem_act_bits: int | None, aux_logits: bool = False
) -> nn.Module:
    """`aux_logits=False` by default: the training engine then sees one logits tensor, as for other models."""
    import torchvision

    model = torchvision.models.inception_v3(
        weights=None, num_classes=num_classes, aux_logits=aux_logits, init_weights=True
    )
    basic = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "BasicConv2d"]
    for i, (name, m) in enumerate(basic):
        bits = stem_act_bits if i == 0 else act_bits
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            child,
            ConvBnAct(m.conv, m.bn, _act(bits, nn.ReLU())),
        )
    return model

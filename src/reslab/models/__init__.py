"""The ResNet model zoo: blocks, one builder, one registry, and a summary measured by a forward pass."""

from reslab.models.blocks import (
    BasicBlock,
    Bottleneck,
    PlainBlock,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualAdd,
    ZeroPadShortcut,
)
from reslab.models.registry import ModelSpec, create_model, get_model_spec, list_models
from reslab.models.resnet import ResNet, make_stage
from reslab.models.summary import complexity, layer_table

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ModelSpec",
    "PlainBlock",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "ResidualAdd",
    "ZeroPadShortcut",
    "complexity",
    "create_model",
    "get_model_spec",
    "layer_table",
    "list_models",
    "make_stage",
]

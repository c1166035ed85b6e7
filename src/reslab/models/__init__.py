"""The model zoo: ResNet blocks and builder, the Inception family, one registry, and a summary
measured by a forward pass."""

from reslab.models.blocks import (
    BasicBlock,
    Bottleneck,
    Concat,
    PlainBlock,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualAdd,
    ScaledResidualAdd,
    ZeroPadShortcut,
)
from reslab.models.inception import GoogLeNetOutputs, InceptionNet, InceptionOutputs
from reslab.models.myrtle import MyrtleResNet9
from reslab.models.registry import InceptionSpec, ModelSpec, MyrtleSpec, create_model, get_model_spec, list_models
from reslab.models.resnet import ResNet, make_stage
from reslab.models.summary import complexity, layer_table

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "Concat",
    "GoogLeNetOutputs",
    "InceptionNet",
    "InceptionOutputs",
    "InceptionSpec",
    "ModelSpec",
    "MyrtleResNet9",
    "MyrtleSpec",
    "PlainBlock",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "ResidualAdd",
    "ScaledResidualAdd",
    "ZeroPadShortcut",
    "complexity",
    "create_model",
    "get_model_spec",
    "layer_table",
    "list_models",
    "make_stage",
]

"""Backbone feature maps (issue 22, item 1): `create_model(name, features_only=True, out_indices=...)`.

Over the registry on the meta device (shapes without arithmetic, so every net is cheap): each map's
channels and stride against `feature_info`. On real weights for one net of each kind: the maps equal
the full model's intermediate activations, taken by hooks on the modules `feature_info` names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from reslab import ReslabError, create_model, list_models
from reslab.models import get_model_spec
from reslab.models.features import FeatureExtractor, FeatureInfo
from test_weights import _foreign_state, hub  # noqa: F401  (the 127.0.0.1 test catalog)

README = Path(__file__).resolve().parents[1] / "README.md"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# timm's resnet50 feature_info (timm.create_model("resnet50", features_only=True).feature_info.info).
# timm names the stem's ReLU `act1`; reslab keeps torchvision's key, `relu`.
TIMM_RESNET50 = [
    {"num_chs": 64, "reduction": 2, "module": "act1"},
    {"num_chs": 256, "reduction": 4, "module": "layer1"},
    {"num_chs": 512, "reduction": 8, "module": "layer2"},
    {"num_chs": 1024, "reduction": 16, "module": "layer3"},
    {"num_chs": 2048, "reduction": 32, "module": "layer4"},
]
# Nets without padding in some layers ("V" in inception.py): their maps are a few pixels short of
# input / reduction, so the stride is read from how the map grows with the input instead.
UNPADDED = {"inception_v3", "inception_v4", "inception_resnet_v2", "inception_resnet_small",
            "inception_resnet_small_plain"}
# resnet1202 and preact_resnet1001 are resnet20 and preact_resnet164 with 200 and 333 blocks a
# stage: the same builder, and seconds to build even on the meta device, so they are left out.
REGISTRY = [n for n in list_models() if n not in ("resnet1202", "preact_resnet1001")]


@pytest.mark.parametrize("name", REGISTRY)
def test_maps_have_the_channels_and_strides_feature_info_gives(name):
    with torch.device("meta"):
        model = create_model(name, features_only=True)
        info = model.feature_info
        assert len(info) == len(info.channels()) == (5 if get_model_spec(name).image_size > 32 else 4)
        assert "fc" not in dict(model.named_children()) and all(info.module_name())
        for module in info.module_name():
            model.get_submodule(module)  # each names a module of the backbone
        size = get_model_spec(name).image_size
        maps = model(torch.empty(2, 3, size, size))
        assert [m.shape[1] for m in maps] == info.channels()
        if name in UNPADDED:
            bigger = model(torch.empty(2, 3, size + 32, size + 32))
            assert [b.shape[-1] - m.shape[-1] for m, b in zip(maps, bigger)] == [32 // r for r in info.reduction()]
        else:
            assert [tuple(m.shape[2:]) for m in maps] == [(size // r, size // r) for r in info.reduction()]
    assert info.reduction() == sorted(info.reduction())


def test_resnet50_levels_are_timms():
    with torch.device("meta"):
        info = create_model("resnet50", features_only=True).feature_info
    ours = [{**d, "module": {"relu": "act1"}.get(d["module"], d["module"])} for d in info]
    assert ours == TIMM_RESNET50
    assert info.channels() == [64, 256, 512, 1024, 2048] and info.reduction() == [2, 4, 8, 16, 32]
    assert info.module_name() == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert info.channels(2) == 512 and info.reduction([0, 4]) == [2, 32] and info[1]["module"] == "layer1"


# One net of each kind of block, stem and layout, on real weights at small inputs (inception_v4: the
# levels inside timm's one `features` sequence; googlenet with torchvision's transform_input).
EQUALITY = [("resnet18", 32), ("resnet50", 32), ("plain18", 32), ("preact_resnet18", 32), ("resnet20", 16),
            ("plain20", 16), ("preact_resnet20", 16), ("preact_resnet164", 16), ("googlenet", 32),
            ("inception_v4", 80), ("inception_small", 16), ("inception_resnet_small", 16)]


def _hooked(model: torch.nn.Module, modules: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    seen = {}
    def keep(name):
        return lambda module, args, out: seen.__setitem__(name, out.clone())

    handles = [model.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
    model(x)
    for handle in handles:
        handle.remove()
    return [seen[m] for m in modules]


@pytest.mark.parametrize("name, size", EQUALITY)
@torch.no_grad()
def test_maps_equal_the_full_models_activations(name, size):
    torch.manual_seed(0)
    full = create_model(name, **({"transform_input": True} if name == "googlenet" else {})).eval()
    backbone = FeatureExtractor(full, name=name)  # what features_only=True wraps, sharing the weights
    ours, theirs = backbone.state_dict(), full.state_dict()
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)  # the full model's keys and tensors
    assert not any(k.startswith(full.classifier_name + ".") for k in ours)  # headless
    x = torch.randn(1, 3, size, size)
    maps = backbone(x)
    expected = _hooked(full, backbone.feature_info.module_name(), x)
    for got, want in zip(maps, expected, strict=True):
        assert torch.equal(got, want)


def test_out_indices_pick_the_maps_in_order_and_drop_what_follows():
    torch.manual_seed(0)
    full = create_model("resnet18").eval()
    backbone = create_model("resnet18", features_only=True, out_indices=(3, 2)).eval()
    assert backbone.feature_info.channels() == [256, 128] and backbone.feature_info.module_name() == ["layer3",
                                                                                                       "layer2"]
    keys = {k.split(".")[0] for k in backbone.state_dict()}
    assert keys == {"conv1", "bn1", "layer1", "layer2", "layer3"}  # layer4 and the head are gone
    backbone.load_state_dict({k: v for k, v in full.state_dict().items() if k.split(".")[0] in keys})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = backbone(x)
        want = _hooked(full, ["layer3", "layer2"], x)
    assert [g.shape for g in got] == [w.shape for w in want] and all(torch.equal(g, w) for g, w in zip(got, want))
    # Inside timm's one `features` sequence, only the children up to the level are kept.
    with torch.device("meta"):
        v4 = create_model("inception_v4", features_only=True, out_indices=(1,))
    assert v4.feature_info.module_name() == ["features.3"] and len(v4.features) == 4


def test_a_deep_stem_and_grayscale_input_give_their_own_levels():
    with torch.device("meta"):
        model = create_model("resnet50", features_only=True, stem="deep", in_channels=1)
        maps = model(torch.empty(1, 1, 64, 64))
    assert model.feature_info.module_name()[0] == "relu" and [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]


@pytest.mark.parametrize("options, message", [
    ({"out_indices": (5,)}, "out_indices (5,) has 5; resnet50 has levels 0, 1, 2, 3, 4"),
    ({"out_indices": 4}, "out_indices must be a list or tuple"),
    ({"out_indices": (1, 1)}, "repeats a level"),
    ({"out_indices": ()}, "is empty"),
    ({"features_only": False, "out_indices": (1,)}, "pass features_only=True too"),
    ({"num_classes": 10}, "num_classes=10 cannot apply"),
    ({"features_only": "yes"}, "features_only must be True or False"),
])
def test_impossible_feature_options_are_one_line_errors(options, message):
    with pytest.raises(ReslabError, match=re.escape(message)) as err:
        create_model("resnet50", **{"features_only": True, **options})
    assert "\n" not in str(err.value)


def test_catalog_weights_become_a_backbone(hub):  # noqa: F811
    entry, server, _ = hub
    full = create_model(entry.name, pretrained=True).eval()
    backbone = create_model(entry.name, pretrained=True, features_only=True, out_indices=(3,)).eval()
    assert isinstance(backbone, FeatureExtractor) and server.requests == 1  # downloaded once, then reused
    assert torch.equal(backbone.conv1.weight, _foreign_state(0)["state_dict"]["module.conv1.weight"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        (last,) = backbone(x)
        assert torch.equal(last, full.forward_features(x))
    # Without pretrained=True, the catalog name gives the architecture the weights need.
    fresh = create_model(entry.name, features_only=True)
    assert fresh.feature_info.channels() == [16, 16, 32, 64] and not torch.equal(fresh.conv1.weight,
                                                                                  backbone.conv1.weight)


def test_feature_info_reads_like_timms():
    info = FeatureInfo([{"num_chs": 8, "reduction": 1, "module": "a"}, {"num_chs": 16, "reduction": 2, "module": "b"},
                        {"num_chs": 32, "reduction": 4, "module": "c"}], out_indices=(0, 2))
    assert info.channels() == [8, 32] and info.reduction() == [1, 4] and info.module_name() == ["a", "c"]
    assert len(info) == 3 and [d["module"] for d in info] == ["a", "b", "c"] and info[1]["num_chs"] == 16
    assert info.get_dicts(keys=["num_chs"]) == [{"num_chs": 8}, {"num_chs": 32}]


def test_the_readme_fpn_example_runs():
    """The README's backbone example, run as written (it asserts its own output shapes)."""
    text = README.read_text()
    example = re.search(r"<!-- features example -->\s*```python\n(.*?)```", text, re.S)
    assert example, "README lost its features example"
    exec(compile(example.group(1), "README.md", "exec"), {})

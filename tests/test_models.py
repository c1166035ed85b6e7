"""The model zoo against the paper, torchvision's reference table and a real third-party checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reslab import ReslabError, create_model, list_models
from reslab.models import ResidualAdd, complexity, get_model_spec, layer_table

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference" / "torchvision_resnet_state_dicts.json"
AKAMASTER_RESNET20 = SHARED / "data" / "pretrained-cifar10" / "resnet20-12fca82f.th"

# Paper section 4.2, table 6: parameter counts of the CIFAR-10 ResNets (option A), as printed.
PAPER_CIFAR_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6,
                      "resnet110": 1.7e6, "resnet1202": 19.4e6}
# Small inputs keep the whole registry's forward and backward passes fast on a laptop CPU.
TEST_SIZE = {"imagenet": 32, "cifar": 8}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# The Inception family has its own file (tests/test_inception.py): other sizes, aux heads, reference.
RESNETS = list_models("imagenet") + list_models("cifar")


@pytest.mark.parametrize("name", RESNETS)
def test_forward_backward_over_registry(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    size = TEST_SIZE[get_model_spec(name).family]
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == [], f"parameters without a finite gradient: {missing[:5]}"
    features = model.forward_features(x)
    assert features.shape[:2] == (2, model.num_features)
    assert torch.allclose(model.forward_head(features), model(x), atol=1e-5)


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference table not present")
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                                  "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"])
def test_state_dict_equals_torchvision(name):
    reference = json.loads(REFERENCE.read_text())[name]
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(reference["state_dict"])  # same keys in the same order
    assert ours == reference["state_dict"]
    assert _params(model) == reference["num_params"]


@pytest.mark.parametrize("name, expected", PAPER_CIFAR_PARAMS.items())
def test_cifar_parameter_counts_match_the_paper(name, expected):
    with torch.device("meta"):
        model = create_model(name)
    # The paper prints two significant digits (three for 19.4M).
    assert abs(_params(model) - expected) <= 0.005e6 if expected < 1e6 else abs(_params(model) - expected) <= 0.05e6


def test_option_a_adds_no_parameters_and_b_c_do():
    a, b, c = (create_model("resnet20", shortcut=s) for s in "ABC")
    plain = create_model("plain20")
    assert _params(a) == _params(plain)
    assert _params(a) < _params(b) < _params(c)
    # Option A: every second pixel, zero channels padded equally on both sides.
    shortcut = a.layer2[0].downsample
    x = torch.randn(1, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("plain")])
def test_plain_nets_have_no_residual_add(name):
    model = create_model(name)
    assert not any(isinstance(m, ResidualAdd) for m in model.modules())
    size = get_model_spec(name).image_size
    assert complexity(model, (3, size, size))["residual_adds"] == 0


def test_residual_adds_are_rows_of_the_layer_table():
    rows = layer_table(create_model("resnet20"), (3, 32, 32))
    adds = [r for r in rows if r.kind == "ResidualAdd"]
    assert len(adds) == 9 and adds[0].name == "layer1.0.add" and adds[-1].output_shape == (64, 8, 8)
    assert sum(r.params for r in rows) == _params(create_model("resnet20"))


def test_macs_match_the_paper_table():
    # Paper Table 1: 1.8, 3.6 GFLOPs (multiply-adds) for ResNet-18/34; 3.8 for ResNet-50 with the
    # stride in the 1x1, as the paper places it (torchvision's placement costs 4.1).
    def gmacs(name, **kw):
        with torch.device("meta"):
            model = create_model(name, **kw)
        return complexity(model.to_empty(device="cpu"), (3, 224, 224))["macs"] / 1e9

    assert round(gmacs("resnet18"), 1) == 1.8
    assert round(gmacs("resnet34"), 1) == 3.7  # 3.66: the paper rounds down to 3.6
    assert round(gmacs("resnet50", stride_in_1x1=True), 1) == 3.9  # 3.86
    assert gmacs("resnet50") > gmacs("resnet50", stride_in_1x1=True)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet20", "preact_resnet50", "resnext50_32x4d"])
def test_zero_init_residual_makes_blocks_identity(name):
    torch.manual_seed(0)
    model = create_model(name, zero_init_residual=True).eval()
    seen = []

    def check(block, inputs, output):
        if block.downsample is None:
            seen.append(torch.allclose(output, inputs[0], atol=1e-6))

    for stage in model.stages:
        for block in stage:
            block.register_forward_hook(check)
    size = get_model_spec(name).image_size // 4
    model(torch.randn(2, 3, size, size))
    assert seen and all(seen)


def test_stride_in_1x1_moves_the_stride():
    v1 = create_model("resnet50", stride_in_1x1=True)
    v15 = create_model("resnet50")
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert v1.state_dict().keys() == v15.state_dict().keys()


def test_options_in_channels_num_classes_reset_classifier():
    model = create_model("resnet18", in_channels=1, num_classes=3)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    model.reset_classifier(5)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    features = create_model("resnet50", num_classes=0)
    assert features(torch.randn(2, 3, 64, 64)).shape == (2, 2048)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("resnet21", {}, r"not 6n\+2"),
        ("resnt50", {}, "did you mean resnet50"),
        ("resnet20", {"shortcut": "D"}, "shortcut must be"),
        ("resnet20", {"stride_in_1x1": True}, "stride_in_1x1"),
        ("plain20", {"shortcut": "B"}, "plain net has no shortcuts"),
        ("resnet20", {"depth": 3}, "unknown option"),
        ("resnet20", {"num_classes": -1}, "num_classes must be"),
    ],
)
def test_impossible_options_are_refused_with_the_reason(name, options, message):
    with pytest.raises(ReslabError, match=message):
        create_model(name, **options)


def test_any_6n_plus_2_depth_by_name():
    model = create_model("plain8")
    assert len(model.layer1) == 1 and not any(isinstance(m, ResidualAdd) for m in model.modules())
    assert create_model("resnet14").layer3[1].downsample is None


def _authors_resnet20(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The forward pass of the option-A CIFAR ResNet as its authors' code writes it, on raw tensors."""

    def bn(t, prefix):
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)

    out = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for stage in (1, 2, 3):
        for i in range(3):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            y = F.relu(bn(F.conv2d(out, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            y = bn(F.conv2d(y, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            planes = y.shape[1]
            if stride != 1 or out.shape[1] != planes:  # LambdaLayer of option A
                out = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
            out = F.relu(y + out)
    out = F.avg_pool2d(out, out.size()[3]).flatten(1)
    return F.linear(out, state["linear.weight"], state["linear.bias"])


@pytest.mark.skipif(not AKAMASTER_RESNET20.exists(), reason="shared pretrained checkpoint not present")
def test_third_party_option_a_checkpoint_loads_and_gives_the_authors_logits():
    checkpoint = torch.load(AKAMASTER_RESNET20, map_location="cpu", weights_only=True)
    raw = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    renamed = {k.replace("linear.", "fc."): v for k, v in raw.items()}
    model = create_model("resnet20")
    model.load_state_dict(renamed, strict=True)
    model.eval()

    # Simple scenes in CIFAR normalization: sky over grass, plain blue sky, sky over sea.
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    scenes = torch.zeros(3, 3, 32, 32)
    scenes[0, :, :16] = torch.tensor([0.5, 0.7, 0.95])[:, None, None]
    scenes[0, :, 16:] = torch.tensor([0.2, 0.6, 0.2])[:, None, None]
    scenes[1] = torch.tensor([0.3, 0.5, 0.9])[:, None, None]
    scenes[2, :, :20] = torch.tensor([0.6, 0.8, 1.0])[:, None, None]
    scenes[2, :, 20:] = torch.tensor([0.1, 0.3, 0.7])[:, None, None]
    x = (scenes - mean) / std
    torch.manual_seed(0)
    noisy = x + 0.05 * torch.randn_like(x)
    with torch.no_grad():
        logits = model(x)
        reference = _authors_resnet20(raw, x)
        assert torch.allclose(logits, reference, atol=1e-4)
        probs = logits.softmax(1)
        again = model(x).softmax(1)
        flipped = model(x.flip(3)).softmax(1)
        jittered = model(noisy).softmax(1)
    assert torch.equal(probs, again)
    # Confident: CIFAR-10 class 0 is "airplane" (sky over grass), 8 is "ship" (sky over sea).
    assert probs[0].argmax() == 0 and probs[0].max() > 0.9
    assert probs[2].argmax() == 8 and probs[2].max() > 0.75
    # Stable: a mirror image and a little noise do not change the confident answers (the plain blue
    # square, scene 1, is ambiguous between bird and ship, as a person would find it).
    confident = torch.tensor([0, 2])
    assert torch.equal(probs.argmax(1), flipped.argmax(1))
    assert torch.equal(probs[confident].argmax(1), jittered[confident].argmax(1))


def test_myrtle_resnet9_has_pages_layers_and_parameter_count():
    """David Page's DAWNBench net (reslab.models.myrtle), counted by hand from its layer list:
    every conv 3x3 without bias, each BN 2 x width, the linear 512 x 10 without bias."""
    conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout  # noqa: E731
    by_hand = (conv_bn(3, 64)  # prep: 1,856
               + conv_bn(64, 128) + 2 * conv_bn(128, 128)  # layer1 and its residual branch: 369,408
               + conv_bn(128, 256)  # layer2: 295,424
               + conv_bn(256, 512) + 2 * conv_bn(512, 512)  # layer3 and its residual branch: 5,901,312
               + 512 * 10)  # linear: 5,120
    assert by_hand == 6_573_120
    model = create_model("myrtle_resnet9")
    assert _params(model) == by_hand
    spec = get_model_spec("myrtle_resnet9")
    assert spec.family == "cifar" and spec.depth == 9 and spec.residual and "Page" in spec.source
    assert model.linear.bias is None and model.classifier_name == "linear"
    assert sum(isinstance(m, ResidualAdd) for m in model.modules()) == 2  # layer1 and layer3 only
    assert not hasattr(model.layer2, "residual")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 512, 4, 4)  # three 2x2 max pools
    # The logits are the bias-free linear of the max-pooled features, scaled by 0.125.
    expected = 0.125 * model.linear(features.amax((2, 3)))
    assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(ReslabError, match="shortcut='B' cannot apply"):
        create_model("myrtle_resnet9", shortcut="B")
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and create_model("myrtle_resnet9", num_classes=0)(x).shape == (2, 512)


def test_myrtle_resnet9_quarter_is_the_same_net_at_a_quarter_of_its_width():
    """reslab's budget net for CIFAR-sized colour images: Page's layers with 16/32/64/128 channels."""
    conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout  # noqa: E731
    by_hand = (conv_bn(3, 16) + conv_bn(16, 32) + 2 * conv_bn(32, 32) + conv_bn(32, 64)
               + conv_bn(64, 128) + 2 * conv_bn(128, 128) + 128 * 10)
    quarter, full = create_model("myrtle_resnet9_quarter"), create_model("myrtle_resnet9")
    assert _params(quarter) == by_hand == 412_944
    assert [name for name, _ in quarter.named_parameters()] == [name for name, _ in full.named_parameters()]
    assert get_model_spec("myrtle_resnet9_quarter").depth == 9
    assert quarter.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 128, 4, 4)


def test_myrtle_resnet9_trains_through_the_cli_on_digits(tmp_path, one_thread):
    from reslab.cli import main

    out = tmp_path / "run"
    # 8 px, the digits' own size (32, the net's native input, costs 16x the arithmetic): 8 -> 4 -> 2 -> 1.
    assert main(["train", "--model", "myrtle_resnet9", "--data", "digits", "--image-size", "8", "--epochs", "1",
                 "--batch-size", "256", "--precision", "fp32", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "myrtle_resnet9" and summary["epochs"] == 1
    assert summary["trainable_params"] == 6_573_120 - 2 * 64 * 9  # digits: one input channel, not three
    assert 0.0 <= summary["test_acc"] <= 1.0

"""The Inception family against torchvision's and timm's reference tables and their forward passes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab import ReslabError, create_model, list_models
from reslab.models import GoogLeNetOutputs, InceptionOutputs, complexity, get_model_spec, layer_table

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "inception_state_dicts.json"
FAMILY = ["googlenet", "inception_v3", "inception_v4", "inception_resnet_v2", "inception_small",
          "inception_resnet_small", "inception_resnet_small_plain"]
# The smallest inputs worth a test: Inception-v3/v4 and Inception-ResNet-v2 need 75 px to keep a
# 1x1 grid after their last reduction; GoogLeNet and the 32 px nets take 32.
TEST_SIZE = {"googlenet": 32, "inception_v3": 75, "inception_v4": 75, "inception_resnet_v2": 75,
             "inception_small": 32, "inception_resnet_small": 32, "inception_resnet_small_plain": 32}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def nets():
    """Each net built once per module (the big ones take a moment); tests set the mode they need."""
    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = create_model(name, **options)
        model = cache[key]
        model.zero_grad(set_to_none=True)
        return model

    return get


def _randomize_batchnorm(model: nn.Module, small_var: bool = False) -> nn.Module:
    """Running statistics and affine parameters far from 0 and 1, so a misplaced BN shows.

    `small_var`: variances near BatchNorm's eps, so that eps 1e-3 against 1e-5 shows too (a whole
    deep net would blow up on them).
    """
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            var = torch.rand(n, generator=g)
            m.running_var.copy_(var * 0.01 + 0.001 if small_var else var + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def test_registry_lists_the_family_with_native_sizes():
    assert list_models("inception") == FAMILY
    sizes = {name: get_model_spec(name).image_size for name in FAMILY}
    assert sizes == {"googlenet": 224, "inception_v3": 299, "inception_v4": 299, "inception_resnet_v2": 299,
                     "inception_small": 32, "inception_resnet_small": 32, "inception_resnet_small_plain": 32}
    assert [n for n in FAMILY if get_model_spec(n).residual] == ["inception_resnet_v2", "inception_resnet_small"]
    assert get_model_spec("googlenet").depth == 22  # "22 layers deep when counting only layers with parameters"
    assert not set(FAMILY) & set(list_models("imagenet") + list_models("cifar"))
    with pytest.raises(ReslabError, match="unknown model family 'vgg'"):
        list_models("vgg")


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference table not present")
@pytest.mark.parametrize("key, name, options", [
    ("googlenet", "googlenet", {}),
    ("googlenet_aux", "googlenet", {"aux_logits": True}),
    ("inception_v3", "inception_v3", {}),
    ("inception_v3_aux", "inception_v3", {"aux_logits": True}),
    ("inception_v4", "inception_v4", {}),
    ("inception_resnet_v2", "inception_resnet_v2", {}),
])
def test_state_dict_equals_the_reference(key, name, options):
    reference = json.loads(REFERENCE.read_text())[key]
    with torch.device("meta"):
        model = create_model(name, **options)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(reference["state_dict"])  # same keys in the same order
    assert ours == reference["state_dict"]
    assert _params(model) == reference["num_params"]


@pytest.mark.parametrize("name", FAMILY)
def test_forward_backward_over_the_family(nets, name):
    model = nets(name, num_classes=7).train()
    size = TEST_SIZE[name]
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == [], f"parameters without a finite gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[:2] == (2, model.num_features)
        assert torch.allclose(model.forward_head(features), model(x), atol=1e-5)


@pytest.mark.parametrize("name, size, weights, output_type", [
    ("googlenet", 32, (0.3, 0.3), GoogLeNetOutputs),
    # The Inception-v3 head pools 5x5/3 and convolves 5x5 on the 17x17 grid: it takes the full 299 px.
    ("inception_v3", 299, (0.4,), InceptionOutputs),
])
def test_aux_heads_in_training_and_not_in_eval(nets, name, size, weights, output_type):
    model = nets(name, num_classes=5, aux_logits=True).train()
    seen = {}
    handles = [getattr(model, head).register_forward_hook(lambda m, i, o, head=head: seen.setdefault(head, o))
               for head in ("aux1", "aux2", "AuxLogits") if hasattr(model, head)]
    out = model(torch.randn(2, 3, size, size))
    for handle in handles:
        handle.remove()
    assert isinstance(out, output_type) and len(out) == 1 + len(weights)
    assert all(t.shape == (2, 5) for t in out)
    assert model.aux_loss_weights == weights
    if name == "googlenet":
        # torchvision's order: the head on inception4a first, in the field it calls aux_logits2.
        assert out.aux_logits2 is seen["aux1"] and out.aux_logits1 is seen["aux2"]
    loss = out[0].logsumexp(1).mean() + sum(w * aux.logsumexp(1).mean() for w, aux in zip(weights, out[1:]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"parameters without a gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        assert isinstance(model(torch.randn(1, 3, size, size)), torch.Tensor)
    heads = [m for n, m in model.named_children() if n in ("aux1", "aux2", "AuxLogits")]
    assert len(heads) == len(weights)
    assert create_model(name).aux_loss_weights == ()  # aux_logits is off by default


def test_transform_input_is_torchvisions_formula(nets):
    model = nets("googlenet", transform_input=True).eval()
    captured = []
    model.conv1.register_forward_hook(lambda m, inputs, o: captured.append(inputs[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    expected = torch.cat([
        x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
        x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
        x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5,
    ], 1)
    assert torch.equal(captured[0], expected)
    # What it is for: an ImageNet-normalized image comes out scaled to [-1, 1], as the ported
    # TensorFlow weights were trained.
    pixels = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        model((pixels - mean) / std)
    assert torch.allclose(captured[1], pixels * 2 - 1, atol=1e-5)


# ---- Modules against functional re-writes of their sources' forward passes -----------------------

def _cbr(x, s, prefix, stride=1, padding=0):
    """torchvision's BasicConv2d / timm's ConvNormAct: conv (no bias), BatchNorm eps 1e-3, ReLU."""
    y = F.conv2d(x, s[f"{prefix}.conv.weight"], stride=stride, padding=padding)
    y = F.batch_norm(y, s[f"{prefix}.bn.running_mean"], s[f"{prefix}.bn.running_var"], s[f"{prefix}.bn.weight"],
                     s[f"{prefix}.bn.bias"], False, 0.0, 1e-3)
    return F.relu(y)


def _googlenet_inception(s, x):
    return torch.cat([
        _cbr(x, s, "branch1"),
        _cbr(_cbr(x, s, "branch2.0"), s, "branch2.1", padding=1),
        _cbr(_cbr(x, s, "branch3.0"), s, "branch3.1", padding=1),
        _cbr(F.max_pool2d(x, 3, 1, 1, ceil_mode=True), s, "branch4.1"),
    ], 1)


def _inception_v3_e(s, x):
    b3 = _cbr(x, s, "branch3x3_1")
    b3 = torch.cat([_cbr(b3, s, "branch3x3_2a", padding=(0, 1)), _cbr(b3, s, "branch3x3_2b", padding=(1, 0))], 1)
    dbl = _cbr(_cbr(x, s, "branch3x3dbl_1"), s, "branch3x3dbl_2", padding=1)
    dbl = torch.cat([_cbr(dbl, s, "branch3x3dbl_3a", padding=(0, 1)),
                     _cbr(dbl, s, "branch3x3dbl_3b", padding=(1, 0))], 1)
    pool = _cbr(F.avg_pool2d(x, 3, 1, 1), s, "branch_pool")  # torchvision counts the padding
    return torch.cat([_cbr(x, s, "branch1x1"), b3, dbl, pool], 1)


def _inception_v4_a(s, x):
    return torch.cat([
        _cbr(x, s, "branch0"),
        _cbr(_cbr(x, s, "branch1.0"), s, "branch1.1", padding=1),
        _cbr(_cbr(_cbr(x, s, "branch2.0"), s, "branch2.1", padding=1), s, "branch2.2", padding=1),
        _cbr(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), s, "branch3.1"),  # timm does not
    ], 1)


def _block35(s, x):
    out = torch.cat([
        _cbr(x, s, "branch0"),
        _cbr(_cbr(x, s, "branch1.0"), s, "branch1.1", padding=1),
        _cbr(_cbr(_cbr(x, s, "branch2.0"), s, "branch2.1", padding=1), s, "branch2.2", padding=1),
    ], 1)
    return F.relu(F.conv2d(out, s["conv2d.weight"], s["conv2d.bias"]) * 0.17 + x)


def _last_block8(s, x):
    branch1 = _cbr(_cbr(_cbr(x, s, "branch1.0"), s, "branch1.1", padding=(0, 1)), s, "branch1.2", padding=(1, 0))
    out = torch.cat([_cbr(x, s, "branch0"), branch1], 1)
    return F.conv2d(out, s["conv2d.weight"], s["conv2d.bias"]) * 1.0 + x  # scale 1, no ReLU


@pytest.mark.parametrize("name, module, channels, rewrite", [
    ("googlenet", "inception3a", 192, _googlenet_inception),
    ("googlenet", "inception4e", 528, _googlenet_inception),
    ("inception_v3", "Mixed_7b", 1280, _inception_v3_e),
    ("inception_v4", "features.6", 384, _inception_v4_a),
    ("inception_resnet_v2", "repeat.0", 320, _block35),
    ("inception_resnet_v2", "block8", 2080, _last_block8),
])
def test_modules_equal_their_sources_forward(nets, name, module, channels, rewrite):
    block = _randomize_batchnorm(copy.deepcopy(nets(name, num_classes=7).get_submodule(module)), small_var=True)
    x = torch.randn(2, channels, 7, 7)
    with torch.no_grad():
        assert torch.allclose(block(x), rewrite(block.state_dict(), x), atol=1e-4)


def test_grids_are_the_sources_sizes(nets):
    # GoogLeNet's pools round up (ceil_mode): 112 -> 56, not 55; Inception-v3's grids are 35/17/8.
    def shapes(name, size):
        return {r.name: r.output_shape for r in layer_table(nets(name, num_classes=7), (3, size, size))}

    g = shapes("googlenet", 224)
    assert g["maxpool1"] == (64, 56, 56) and g["maxpool3"] == (480, 14, 14) and g["maxpool4"] == (832, 7, 7)
    v3 = shapes("inception_v3", 299)
    assert v3["Mixed_5b.concat"] == (256, 35, 35) and v3["Mixed_6e.concat"] == (768, 17, 17)
    assert v3["Mixed_7c.concat"] == (2048, 8, 8)


# ---- The layer table ------------------------------------------------------------------------------

def test_layer_table_has_each_concat_in_execution_order(nets):
    model = nets("googlenet", num_classes=7)
    rows = layer_table(model, (3, 224, 224))
    concats = [r for r in rows if r.kind == "Concat"]
    modules = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    assert [r.name for r in concats] == [f"inception{m}.concat" for m in modules]
    # The paper's Table 1 output widths.
    assert [r.output_shape[0] for r in concats] == [256, 480, 512, 512, 512, 528, 832, 832, 1024]
    names = [r.name for r in rows]
    for r in concats:  # after the module's last branch layer, before anything that follows
        i = names.index(r.name)
        module = r.name.removesuffix(".concat")
        assert names[i - 1].startswith(f"{module}.branch4") and not names[i + 1].startswith(module)
    assert sum(r.params for r in rows) == _params(model)
    assert complexity(model, (3, 224, 224))["concats"] == 9


def test_inception_v3_forks_are_concats_of_their_own(nets):
    names = [r.name for r in layer_table(nets("inception_v3", num_classes=7), (3, 75, 75)) if r.kind == "Concat"]
    assert names[-6:] == ["Mixed_7b.concat1", "Mixed_7b.concat2", "Mixed_7b.concat",
                          "Mixed_7c.concat1", "Mixed_7c.concat2", "Mixed_7c.concat"]


def test_inception_resnet_shows_concats_and_residual_adds(nets):
    rows = layer_table(nets("inception_resnet_v2", num_classes=7), (3, 75, 75))
    adds = [r for r in rows if r.kind == "ResidualAdd"]
    concats = [r for r in rows if r.kind == "Concat"]
    assert len(adds) == 10 + 20 + 9 + 1 and len(concats) == 3 + 40
    assert {r.output_shape[0] for r in adds} == {320, 1088, 2080}
    names = [r.name for r in rows]
    for add in adds:  # branches -> concat -> linear 1x1 -> scaled add
        block = add.name.removesuffix(".add")
        i = names.index(add.name)
        assert names[i - 2 : i] == [f"{block}.concat", f"{block}.conv2d"]
    assert names.index("block8.add") == len(names) - 6  # no ReLU after it: conv2d_7b follows


def test_plain_twin_is_inception_resnet_small_without_its_adds(nets):
    """Same branches, widths, depth and MACs; each block's 1x1 conv back to its input width stays
    (as conv-BN-ReLU), only the scaled add is gone (reslab experiment inception compares the two)."""
    residual, plain = nets("inception_resnet_small", num_classes=7), nets("inception_resnet_small_plain", num_classes=7)
    assert get_model_spec("inception_resnet_small_plain").depth == get_model_spec("inception_resnet_small").depth
    assert not get_model_spec("inception_resnet_small_plain").residual
    rows = {name: layer_table(net, (3, 32, 32)) for name, net in (("res", residual), ("plain", plain))}
    assert not any(r.kind == "ResidualAdd" for r in rows["plain"])
    # Every conv in the same order with the same shape: the 1x1 projection of block k is conv k.
    convs = {name: [(r.output_shape, r.macs) for r in table if r.kind == "Conv2d"] for name, table in rows.items()}
    assert convs["plain"] == convs["res"]
    assert sum(r.kind == "Concat" for r in rows["plain"]) == sum(r.kind == "Concat" for r in rows["res"]) == 11
    # The linear 1x1's bias (C) becomes BN's scale and shift (2C), 64 + 192 + 376 channels, 3 blocks each.
    assert _params(plain) - _params(residual) == 3 * (64 + 192 + 376)
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), residual.eval()
    with torch.no_grad():
        assert plain.forward_features(x).shape == residual.forward_features(x).shape == (2, 384, 7, 7)


def test_summary_command_shows_concat_rows(capsys):
    from reslab.cli import main

    assert main(["summary", "inception_resnet_small"]) == 0
    printed = capsys.readouterr().out
    assert "(||) concat" in printed and "(+) residual add" in printed
    assert "Concats: 11" in printed and "Residual adds: 9" in printed  # 3 + 3 + 3 blocks, 2 reductions


# ---- Options ----------------------------------------------------------------------------------------

def test_in_channels_num_classes_and_reset_classifier():
    model = create_model("inception_small", in_channels=1, num_classes=3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    model.reset_classifier(5)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, model.num_features)
    assert create_model("inception_resnet_small", num_classes=0)(torch.randn(2, 3, 32, 32)).shape == (2, 384)

    aux = create_model("googlenet", in_channels=1, aux_logits=True).train()
    aux.reset_classifier(4)  # the auxiliary heads follow, or their loss could not be computed
    assert all(t.shape == (2, 4) for t in aux(torch.randn(2, 1, 32, 32)))
    with pytest.raises(ReslabError, match="auxiliary classifiers need classes"):
        aux.reset_classifier(0)


@pytest.mark.parametrize("name, classifier", [("googlenet", "fc"), ("inception_v3", "fc"),
                                              ("inception_v4", "last_linear"), ("inception_resnet_v2", "classif")])
def test_classifier_names_are_the_sources(name, classifier):
    with torch.device("meta"):
        model = create_model(name, in_channels=1)
        assert model.get_classifier() is getattr(model, classifier) and model.classifier_name == classifier
        first = next(p for n, p in model.named_parameters() if n.endswith("conv.weight"))
        assert first.shape[1] == 1
        model.reset_classifier(3)
    assert getattr(model, classifier).out_features == 3


@pytest.mark.parametrize("name, layer", [("googlenet", "inception5b"), ("inception_v3", "Mixed_7c"),
                                         ("inception_v4", "features.21"), ("inception_resnet_v2", "conv2d_7b"),
                                         ("inception_small", "inception5b"), ("inception_resnet_small", "conv_head")])
def test_feature_layer_is_the_map_the_head_pools(nets, name, layer):
    model = nets(name, num_classes=7).eval()
    assert model.feature_layer == layer
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    size = TEST_SIZE[name]
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, size, size))
    handle.remove()
    assert torch.equal(seen[-1], features)


def test_zero_init_residual_makes_inception_resnet_blocks_identity():
    torch.manual_seed(0)
    model = create_model("inception_resnet_small", zero_init_residual=True).eval()
    checked = []

    def check(block, inputs, output):
        checked.append(torch.equal(output, inputs[0]))

    for m in model.modules():
        if getattr(m, "residual", False):
            m.register_forward_hook(check)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(checked) == 9 and all(checked)


@pytest.mark.parametrize("name, options, message", [
    ("inception_v3", {"shortcut": "B"}, "has no shortcuts"),
    ("inception_resnet_v2", {"shortcut": "A"}, "identity shortcut"),
    ("googlenet", {"stride_in_1x1": True}, "stride_in_1x1 places the stride"),
    ("inception_v4", {"aux_logits": True}, "no auxiliary classifiers; aux_logits applies to googlenet and inc"),
    ("googlenet", {"aux_logits": True, "num_classes": 0}, "needs classes"),
    ("inception_resnet_v2", {"transform_input": True}, "belongs to torchvision's googlenet and inception_v3"),
    ("googlenet", {"transform_input": True, "in_channels": 1}, "needs in_channels=3, got 1"),
    ("googlenet", {"zero_init_residual": True}, "no residual branches"),
    ("resnet20", {"aux_logits": True}, "a ResNet has none"),
    ("resnet50", {"transform_input": True}, "transform_input re-scales"),
    ("inception_small", {"num_classes": 2.5}, "num_classes must be an integer"),
])
def test_options_that_cannot_apply_are_refused_with_the_reason(name, options, message):
    with pytest.raises(ReslabError, match=message):
        create_model(name, **options)


# ---- Export ---------------------------------------------------------------------------------------

# The TorchScript exporter (dynamo=False, as reslab's export uses it) warns that it is deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name, options", [("googlenet", {"aux_logits": True, "transform_input": True}),
                                           ("inception_resnet_small", {})])
def test_eval_graph_traces_and_exports_to_onnx(tmp_path, name, options):
    torch.manual_seed(0)
    model = _randomize_batchnorm(create_model(name, num_classes=3, **options))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        # fx is what BatchNorm folding traces with; the eval graph has no data-dependent branch.
        assert torch.allclose(torch.fx.symbolic_trace(model)(x), expected, atol=1e-5)
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model(y)
    (got,) = session.run(None, {"input": y.numpy()})
    assert torch.allclose(torch.from_numpy(got), reference, rtol=1e-4, atol=1e-4)

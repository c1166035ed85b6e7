"""The fast inference path: BN folding is exact, backends agree, bad options are refused."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta, save_weights
from reslab.errors import ReslabError
from reslab.hardware import bf16_is_fast
from reslab.inference import Predictor, fold_batchnorm, installed_backends, resolve_backend
from reslab.models import Bottleneck, ResNet, create_model


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


def tiny_resnext() -> nn.Module:
    """Grouped bottlenecks with projection shortcuts (the ResNeXt shape), small enough for a test."""
    return ResNet(Bottleneck, [1, 1, 1, 1], [8, 8, 16, 16], num_classes=7, groups=4, width_per_group=16)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20", "resnet18", "tiny_resnext"])
def test_fold_batchnorm_leaves_outputs_unchanged(name):
    torch.manual_seed(0)
    size = 32
    model = randomize_batchnorm(tiny_resnext() if name == "tiny_resnext" else create_model(name, num_classes=7))
    folded = fold_batchnorm(model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    if name.startswith("preact"):
        # BN -> ReLU -> conv cannot fold; only the BN after each block's first conv can.
        assert 0 < remaining < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    else:
        assert remaining == 0
    # The original is untouched and the copy keeps the model's interface.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert folded.forward_features(x).shape == model.forward_features(x).shape


def test_fold_batchnorm_keeps_a_conv_used_twice_unfolded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is needed unnormalized too

    model = randomize_batchnorm(Branchy())
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("resnet20", num_classes=3))
    meta = CheckpointMeta(model="resnet20", classes=["cat", "dog", "owl"],
                          preprocessing={"image_size": 16, "in_channels": 3, "mean": [0.5, 0.5, 0.5],
                                         "std": [0.25, 0.25, 0.25], "resize": "squash", "interpolation": "bilinear"})
    return save_weights(tmp_path / "best.safetensors", model, meta)


@pytest.fixture
def images():
    return torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def eager_logits(checkpoint, images):
    predictor = Predictor(checkpoint, backend="torch", precision="fp32")
    with torch.no_grad():
        return predictor.model(predictor.normalize(images))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_backends_agree_with_eager_pytorch(backend, checkpoint, images, tmp_path, monkeypatch):
    if backend not in installed_backends():
        pytest.skip(f"{backend} not installed")
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    expected = eager_logits(checkpoint, images)
    predictor = Predictor(checkpoint, backend=backend, precision="fp32")
    got = predictor.logits(images)
    assert predictor.backend == backend
    assert (got - expected).abs().max() < 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))
    if backend != "torch":  # exported once into the cache, keyed by the weights
        assert len(list((tmp_path / "cache" / "export").glob("resnet20-*"))) >= 1


def test_bf16_torch_path_close_to_fp32(checkpoint, images):
    expected = eager_logits(checkpoint, images)
    with pytest.warns(UserWarning, match="slower") if not bf16_is_fast("cpu") else contextlib.nullcontext():
        predictor = Predictor(checkpoint, backend="torch", precision="bf16")
    got = predictor.logits(images)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_channels_last_and_compile_options(checkpoint, images):
    expected = eager_logits(checkpoint, images)
    predictor = Predictor(checkpoint, backend="torch", precision="fp32", channels_last=True)
    assert predictor.runner.channels_last
    assert (predictor.logits(images) - expected).abs().max() < 1e-4


def test_auto_backend_is_installed_and_fastest_first():
    assert resolve_backend("auto", "cpu") in installed_backends()
    assert resolve_backend("auto", "cuda") == resolve_backend("auto", torch.device("cuda:1")) == "torch"
    with pytest.raises(ReslabError, match="backend must be one of"):
        resolve_backend("tensorrt")


def test_onnxruntime_refuses_bf16_and_takes_auto_as_fp32(checkpoint, monkeypatch):
    if "onnxruntime" not in installed_backends():
        pytest.skip("onnxruntime not installed")
    with pytest.raises(ReslabError, match="fp32 only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Predictor(checkpoint, backend="onnxruntime", precision="bf16")
    monkeypatch.setenv("RESLAB_CPU_BF16", "1")  # a CPU where `auto` means bf16 for the other backends
    assert Predictor(checkpoint, backend="onnxruntime").precision == "fp32"


def test_missing_backend_names_the_extra(monkeypatch, checkpoint):
    from reslab.inference import backends

    monkeypatch.setattr(backends, "installed_backends", lambda: ["torch"])
    with pytest.raises(ReslabError, match=r"reslab\[openvino\]"):
        Predictor(checkpoint, backend="openvino")
    assert Predictor(checkpoint).backend == "torch"  # auto falls back to torch without the extras


# command -> (positional arguments, the shared inference options it offers)
INFERENCE_COMMANDS = {
    "predict": (["RUN", "x.png"], ["--device", "--backend", "--precision", "--top-k"]),
    "evaluate": (["RUN"], ["--device", "--backend", "--precision"]),
    "serve": (["RUN"], ["--device", "--backend", "--precision", "--top-k"]),
    "explain": (["RUN", "x.png"], ["--device", "--top-k"]),
    "bench": ([], ["--device", "--backend", "--precision"]),
}


@pytest.mark.parametrize("command", sorted(INFERENCE_COMMANDS))
def test_every_inference_command_checks_its_options_at_the_door(command, capsys):
    from reslab.cli import build_parser

    parser = build_parser()
    positional, offered = INFERENCE_COMMANDS[command]
    base = [command, *positional]
    defaults = vars(parser.parse_args(base))
    assert defaults["device"] == "cpu" and defaults.get("backend", "auto") == "auto"
    assert defaults.get("precision", "auto") == "auto" and defaults.get("top_k", 5) == 5
    bad = {"--device": ("tpu", "unknown device type 'tpu'"),
           "--backend": ("tensorrt", "invalid choice: 'tensorrt' (choose from 'auto', 'torch', 'onnxruntime', "
                                     "'openvino')"),
           "--precision": ("fp16", "invalid choice: 'fp16' (choose from 'fp32', 'bf16', 'auto', 'int8')"),
           "--top-k": ("0", "top-k must be an integer of at least 1, got 0")}
    for flag in offered:
        value, words = bad[flag]
        with pytest.raises(SystemExit) as exit:
            parser.parse_args([*base, flag, value])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"argument {flag}: " in err and words in err, err
    if "--top-k" in offered:
        assert parser.parse_args([*base, "--top-k", "3"]).top_k == 3
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--top-k", "three"])
        assert "invalid int value: 'three'" in capsys.readouterr().err


def test_building_the_parser_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from reslab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_library_callers_are_checked_by_the_predictor(checkpoint):
    with pytest.raises(ReslabError, match="top-k must be an integer of at least 1, got 0"):
        Predictor(checkpoint, top_k=0)
    with pytest.raises(ReslabError, match="unknown device type 'tpu'"):
        Predictor(checkpoint, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ReslabError, match="no CUDA device"):
            Predictor(checkpoint, device="cuda:5")
    with pytest.raises(ReslabError, match="backend must be one of"):
        Predictor(checkpoint, backend="tensorrt")
    predictor = Predictor(checkpoint, backend="torch", top_k=2)
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    assert [len(row) for row in predictor.top(predictor.probabilities(images))] == [2, 2]
    assert [len(row) for row in predictor.top(predictor.probabilities(images), 9)] == [3, 3]  # 3 classes
    with pytest.raises(ReslabError, match="got -1"):
        predictor.top(predictor.probabilities(images), -1)


@pytest.fixture
def openvino_file(tmp_path):
    if "openvino" not in installed_backends():
        pytest.skip("openvino not installed")
    from reslab.inference.export import export_openvino

    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("resnet20", num_classes=3))
    meta = CheckpointMeta(model="resnet20", classes=["cat", "dog", "owl"],
                          preprocessing={"image_size": 32, "in_channels": 3})
    return model, export_openvino(model, meta, tmp_path / "m.xml")


def test_openvino_runner_compiles_each_batch_size_with_its_settings(openvino_file):
    """One image: LATENCY on one request; a batch: THROUGHPUT, cut across the streams' requests, all of
    them used (a single request on a THROUGHPUT compile would run one stream). Read back from what
    OpenVINO compiled and ran, so a setting it silently dropped fails here."""
    import os

    from reslab.inference import OpenVinoRunner, openvino_settings

    model, path = openvino_file
    runner = OpenVinoRunner(path, precision="fp32", threads=2)
    for batch_size in (1, 8):
        x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(batch_size))
        with torch.no_grad():
            expected = model(x)
        assert (runner(x) - expected).abs().max() < 1e-4
        compiled, requests = runner.compiled(batch_size)
        hint = "LATENCY" if batch_size == 1 else "THROUGHPUT"
        assert openvino_settings(batch_size, 2)["PERFORMANCE_HINT"] == hint
        assert str(compiled.get_property("PERFORMANCE_HINT")) == hint
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
        if batch_size == 1:
            assert int(compiled.get_property("NUM_STREAMS")) == 1 and len(requests) == 1
        elif (os.cpu_count() or 1) >= 2:
            assert int(compiled.get_property("NUM_STREAMS")) == len(requests) == 2
            assert [r.get_output_tensor(0).shape[0] for r in requests] == [4, 4]  # the batch was split
    # Compiled once per distinct setting: batch sizes sharing a hint share the compile.
    assert runner.compiled(8) is runner.compiled(16) and runner.compiled(1) is not runner.compiled(8)
    assert len(runner._compiled) == 2
    # A forced hint holds at every batch size, and threads are part of what is compiled.
    forced = OpenVinoRunner(path, precision="fp32", threads=1, hint="LATENCY")
    compiled, requests = forced.compiled(8)
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY" and len(requests) == 1
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1


def test_openvino_settings_never_ask_for_more_streams_than_images():
    from reslab.inference import openvino_settings

    assert openvino_settings(1, 16) == {"PERFORMANCE_HINT": "LATENCY"}
    assert openvino_settings(2, 16)["PERFORMANCE_HINT_NUM_REQUESTS"] == 2
    assert openvino_settings(32, 2)["PERFORMANCE_HINT_NUM_REQUESTS"] == 2

"""Grad-CAM: a known answer (a toy model whose only evidence sits in one corner), every family, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.checkpoint import CheckpointMeta, save_weights
from reslab.errors import ReslabError
from reslab.explain import Explainer, grad_cam
from reslab.inference import Predictor
from reslab.models import create_model

SIZE, PATCH = 16, 3
MEAN, STD = 0.2, 0.25


def toy_images(n: int, generator: torch.Generator, corner: int | None = None):
    """Dark noise; class "square" has a bright 3x3 square somewhere (or in `corner` 0..3), "blank" has none."""
    x = torch.rand(n, 1, SIZE, SIZE, generator=generator) * 0.4
    y = torch.randint(0, 2, (n,), generator=generator) if corner is None else torch.ones(n, dtype=torch.long)
    for i in range(n):
        if y[i] == 0:
            continue
        if corner is None:
            r, c = torch.randint(0, SIZE - PATCH + 1, (2,), generator=generator).tolist()
        else:
            r, c = (0 if corner < 2 else SIZE - PATCH), (0 if corner % 2 == 0 else SIZE - PATCH)
        x[i, :, r : r + PATCH, c : c + PATCH] = 0.8 + 0.2 * torch.rand(1, generator=generator).item()
    return x, y


def _train(net, in_channels: int, generator, steps: int) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        x, y = toy_images(32, generator)
        loss = torch.nn.functional.cross_entropy(net((x.expand(-1, in_channels, -1, -1) - MEAN) / STD), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def toy_checkpoint(path, *, train_steps: int = 30, model: str = "resnet20", in_channels: int = 1):
    """A reslab weights file for a 2-class model at 16x16, trained (if train_steps) on `toy_images`.

    Squares appear anywhere during training, so the network has to learn *what* a square is, not
    where; Grad-CAM must then find *where* it is.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = create_model(model, num_classes=2, in_channels=in_channels)
    threads = torch.get_num_threads()
    # One thread: at 16x16 a second one gains little, and on a loaded machine two spin-waiting
    # OpenMP threads made this ten times slower (measured: 8 s against 108 s).
    torch.set_num_threads(1)
    try:
        _train(net, in_channels, generator, train_steps)
    finally:
        torch.set_num_threads(threads)
    meta = CheckpointMeta(
        model=model,
        model_options={"in_channels": in_channels},
        classes=["blank", "square"],
        preprocessing={"image_size": SIZE, "in_channels": in_channels, "mean": [MEAN] * in_channels,
                       "std": [STD] * in_channels, "resize": "center_crop"},
    )
    return save_weights(path, net.eval(), meta)


def to_png(tensor: torch.Tensor, path):
    Image.fromarray((tensor[0].numpy() * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return toy_checkpoint(tmp_path_factory.mktemp("toy") / "toy.safetensors")


@pytest.mark.parametrize("corner", [0, 1, 2, 3])
def test_heat_map_peaks_in_the_corner_that_holds_the_evidence(trained, tmp_path, corner):
    explainer = Explainer(Predictor(trained))
    images, _ = toy_images(3, torch.Generator().manual_seed(100 + corner), corner=corner)
    for i in range(len(images)):
        result = explainer.explain(to_png(images[i], tmp_path / f"{i}.png"))
        assert result.class_name == "square"
        assert result.layer == "layer3"
        row, col = np.unravel_index(result.heatmap.argmax(), result.heatmap.shape)
        half = SIZE // 2
        assert (row < half) == (corner < 2) and (col < half) == (corner % 2 == 0), (corner, row, col)
        assert result.heatmap.max() == pytest.approx(1.0) and result.heatmap.min() >= 0.0


def test_heat_map_for_another_class_and_top_k(trained, tmp_path):
    explainer = Explainer(Predictor(trained))
    images, _ = toy_images(1, torch.Generator().manual_seed(7), corner=3)
    path = to_png(images[0], tmp_path / "x.png")
    result = explainer.explain(path, class_name="blank", top_k=5)
    assert result.class_name == "blank" and result.class_index == 0
    assert result.probability == pytest.approx(dict(result.top_k)["blank"])
    assert [name for name, _ in result.top_k] == ["square", "blank"]  # k clipped to the 2 classes
    assert sum(p for _, p in result.top_k) == pytest.approx(1.0, abs=1e-5)
    overlay = result.overlay()
    assert overlay.shape == result.image.shape and overlay.dtype == np.uint8
    with pytest.raises(ReslabError, match="unknown class 'dog'.*blank, square"):
        explainer.explain(path, class_name="dog")


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("preact_resnet18", 64),
                                       ("resnext50_32x4d", 64), ("plain18", 64), ("preact_resnet20", 16),
                                       ("plain20", 16)])
def test_every_family_default_layer_is_the_last_stage(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    heatmap, logits, index = grad_cam(model, torch.randn(1, 3, size, size), model.stage_names[-1])
    assert heatmap.shape == (size, size) and torch.isfinite(heatmap).all()
    assert 0.0 <= float(heatmap.min()) and float(heatmap.max()) <= 1.0
    assert index == int(logits.argmax()) and logits.shape == (3,)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_intermediate_layer_and_bad_layers():
    model = create_model("resnet20", num_classes=2).eval()
    x = torch.randn(1, 3, 16, 16)
    heatmap, _, _ = grad_cam(model, x, "layer2.0", class_index=1)
    assert heatmap.shape == (16, 16)
    with pytest.raises(ReslabError, match="no layer 'layer9'.*layer1, layer2, layer3"):
        grad_cam(model, x, "layer9")
    with pytest.raises(ReslabError, match="not a feature map"):
        grad_cam(model, x, "fc")
    # The hook is gone after an error: the model runs normally again.
    assert not model.fc._forward_hooks and model(x).shape == (1, 2)


def test_explain_cli_writes_one_figure_per_image(trained, tmp_path, capsys):
    from reslab.cli import main

    images, _ = toy_images(2, torch.Generator().manual_seed(3), corner=0)
    (tmp_path / "a").mkdir()
    paths = [to_png(images[0], tmp_path / "cat.png"), to_png(images[1], tmp_path / "a" / "cat.png")]
    out = tmp_path / "out"
    assert main(["explain", str(trained), *map(str, paths), "--out", str(out), "--layer", "layer2"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cat-2-gradcam.png", "cat-gradcam.png"]
    with Image.open(out / "cat-gradcam.png") as figure:
        assert figure.format == "PNG" and figure.width > figure.height  # image, overlay, bars side by side
    assert "square" in capsys.readouterr().out

    assert main(["explain", str(trained), str(paths[0]), "--layer", "nope", "--out", str(out)]) == 2
    assert "no layer 'nope'" in capsys.readouterr().err
    assert main(["explain", str(trained), str(tmp_path / "missing.png")]) == 2
    assert "image not found" in capsys.readouterr().err

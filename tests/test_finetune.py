"""Fine-tuning (issue 13): `--pretrained` by catalog name, the weights' own normalization, the
finetune recipe (head alone first, body frozen; then discriminative lrs), exact resume through
its phases, and Inception's auxiliary losses in the step."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from reslab.checkpoint import read_weights
from reslab.cli import main
from reslab.errors import ReslabError
from reslab.train import TrainConfig, train
from reslab.train.steps import build_optimizer, make_step
from test_train import make_folder
from test_weights import hub  # noqa: F401 (fixture: a catalog entry served from 127.0.0.1)


def _config(folder, out, entry, **overrides) -> TrainConfig:
    options = dict(model="resnet8", data=str(folder), data_dir=str(folder.parent / "cache"), image_size=16,
                   pretrained=entry.name, recipe="finetune", epochs=2, batch_size=8, val_split=0.25,
                   precision="fp32", out=str(out), quiet=True)
    return TrainConfig(**{**options, **overrides})


def test_finetune_trains_the_head_alone_first_then_resumes_exactly(hub, tmp_path):  # noqa: F811
    entry, _, _ = hub
    folder = make_folder(tmp_path / "shapes", per_class=8)
    pretrained = {k.removeprefix("module.").replace("linear.", "fc."): v
                  for k, v in torch.load(hub[2], weights_only=True)["state_dict"].items()}
    steps = {}

    def stop_at_end_of_head_epoch(epoch, step):
        steps[epoch] = step
        return epoch == 1 and step == 3  # 24 training images / batch 8

    cut = train(_config(folder, tmp_path / "cut", entry), stop=stop_at_end_of_head_epoch)
    assert cut["interrupted"]
    weights, meta = read_weights(tmp_path / "cut" / "last.safetensors")
    body = [k for k in pretrained if not k.startswith("fc.")]
    assert all(torch.equal(weights[k], pretrained[k]) for k in body)  # frozen, BatchNorm statistics included
    assert not torch.equal(weights["fc.weight"], pretrained["fc.weight"])  # the head trained
    # The weights' own statistics, recorded for evaluation, not the data's.
    assert meta.preprocessing["mean"] == [0.5] * 3 and meta.preprocessing["std"] == [0.25] * 3
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["preprocessing"]["mean"] == [0.5] * 3 and config["pretrained"]["weights"] == entry.name

    resumed = train(TrainConfig(resume=str(tmp_path / "cut"), quiet=True))
    whole = train(_config(folder, tmp_path / "whole", entry))
    assert resumed["epochs"] == whole["epochs"] == 2
    a, _ = read_weights(tmp_path / "cut" / "last.safetensors")
    b, _ = read_weights(tmp_path / "whole" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, through the phase change
    assert not all(torch.equal(b[k], pretrained[k]) for k in body)  # the second phase trains the body


def test_discriminative_learning_rates():
    from reslab.models import create_model

    model = create_model("resnet8", num_classes=3)
    cfg = TrainConfig(model="resnet8", recipe="finetune", pretrained="x", lr=0.1, layer_decay=0.5,
                      head_lr_mult=5.0).resolve()
    optimizer = build_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.layer3[0].conv1.weight)] == pytest.approx(0.1)
    assert lr_of[id(model.layer2[0].conv1.weight)] == pytest.approx(0.05)
    assert lr_of[id(model.layer1[0].conv1.weight)] == pytest.approx(0.025)
    assert lr_of[id(model.conv1.weight)] == pytest.approx(0.0125)
    assert lr_of[id(model.fc.weight)] == pytest.approx(0.5)
    assert len(lr_of) == sum(1 for _ in model.parameters())


def test_finetune_needs_pretrained_weights_and_catalog_names_imply_the_model(capsys, tmp_path):
    with pytest.raises(ReslabError, match="--recipe finetune fine-tunes pretrained weights"):
        TrainConfig(recipe="finetune").resolve()
    with pytest.raises(ReslabError, match="--head-epochs must be"):
        TrainConfig(pretrained="x", head_epochs=3, epochs=3).resolve()
    assert main(["train", "--pretrained", "resnet50.tv2_in1k", "--model", "resnet18", "--data", "digits",
                 "--quiet", "--out", str(tmp_path / "x")]) == 2
    assert "use --model resnet50" in capsys.readouterr().err


def test_auxiliary_losses_are_weighted_into_the_step():
    class TwoHeads(nn.Module):
        aux_loss_weights = (0.3,)

        def __init__(self):
            super().__init__()
            self.main, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return (self.main(x), self.aux(x)) if self.training else self.main(x)

    torch.manual_seed(0)
    model = TwoHeads()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ce = nn.CrossEntropyLoss()
    with torch.no_grad():
        expected = ce(model.main(x), y) + 0.3 * ce(model.aux(x), y)
    step = make_step(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="fp32", grad_clip=None,
                     loss_fn=ce)
    loss, _ = step(x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

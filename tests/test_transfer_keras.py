"""Keras applications ResNet50 weights, written by Keras itself, give Keras's outputs in reslab.

Slow (importing Keras alone takes seconds), so marked `slow`; skipped where keras is absent.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from reslab.models import create_model
from reslab.transfer import load_pretrained, model_options_for

pytestmark = [
    pytest.mark.slow,
    # keras 3's torch backend with numpy 2, inside Keras: not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def keras_resnet50(tmp_path_factory):
    os.environ.setdefault("KERAS_BACKEND", "torch")  # keras 3 reads it once, at import
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    # 32x32 input (Keras's minimum) keeps it fast; logits, not softmax, so the comparison is strict.
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10,
                                        classifier_activation=None)
    rng = np.random.default_rng(0)
    # Random BN statistics and conv biases: with Keras's defaults (mean 0, var 1, bias 0) a
    # wrong bias fold or epsilon would go unnoticed.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))
        elif isinstance(layer, keras.layers.Conv2D):
            layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape[0]).astype("float32"))
    folder = tmp_path_factory.mktemp("keras")
    files = {"weights.h5": folder / "resnet50.weights.h5", "legacy .h5": folder / "resnet50.h5"}
    model.save_weights(files["weights.h5"])
    model.save(files["legacy .h5"])
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    return files, x, logits


@pytest.mark.parametrize("layout", ["weights.h5", "legacy .h5"])
def test_keras_resnet50_matches_keras_outputs(keras_resnet50, layout):
    files, x, expected = keras_resnet50
    path = str(files[layout])
    options = model_options_for(path)
    assert options == {"stride_in_1x1": True}
    model = create_model("resnet50", num_classes=10, **options).eval()
    report = load_pretrained(model, path, model_name="resnet50", quiet=True)
    assert report["kind"] == "keras" and report["head"] == "loaded"
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()  # NHWC -> NCHW
    assert np.abs(expected).max() > 1.0  # non-trivial logits
    assert np.abs(logits - expected).max() < 1e-4


def test_keras_weights_in_a_new_head(keras_resnet50):
    files, x, _ = keras_resnet50
    model = create_model("resnet50", num_classes=0, stride_in_1x1=True).eval()
    report = load_pretrained(model, str(files["weights.h5"]), model_name="resnet50", quiet=True)
    assert report["head"].startswith("dropped")
    with torch.no_grad():
        assert model(torch.from_numpy(x).permute(0, 3, 1, 2)).shape == (2, 2048)

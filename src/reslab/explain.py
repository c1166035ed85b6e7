"""Grad-CAM: where in the image the network found the evidence for a class.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization" (ICCV 2017). For a class score y^c (before the softmax) and the feature maps A^k of
a convolutional layer, each map is weighted by its average gradient (the paper's equation 1),
alpha_k = mean_ij dy^c / dA^k_ij, and the map is ReLU(sum_k alpha_k A^k) (equation 2): only the
regions that push the score *up* are kept. The last stage is the default layer because it has the
best trade-off of high-level semantics and spatial detail (the paper's section 3).

`reslab explain` and `reslab serve`'s `/explain` both go through `Explainer`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from reslab.errors import ReslabError
from reslab.inference.predictor import Predictor

# The backdrop of an overlay is the crop the network saw, redrawn from the full-resolution image at
# this size at least: a CIFAR model's 32x32 input is too small to look at.
DISPLAY_SIZE = 320


def stage_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "stage_names", []))


def default_layer(model: nn.Module) -> str:
    """The last stage (`layer4` for ImageNet nets, `layer3` for CIFAR nets), or the block whose output
    an Inception net pools (its `feature_layer`, e.g. `inception5b`, `Mixed_7c`)."""
    if getattr(model, "feature_layer", None):
        return model.feature_layer
    names = stage_names(model)
    if not names:
        raise ReslabError(f"{type(model).__name__} has no stages; name a convolutional layer with --layer")
    return names[-1]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise ReslabError(
            f"no layer {name!r} in this model; use a stage ({', '.join(stage_names(model))}) "
            "or another module name from `reslab summary`"
        )
    return modules[name]


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: str, class_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Grad-CAM of one normalized input `x` (1 x C x H x W).

    Returns the heat map (H x W, in [0, 1], upsampled to the input's size), the logits and the
    explained class index (the top class unless `class_index` is given). The model is not modified:
    no parameter gradient is accumulated and the hook is removed before returning.
    """
    target = find_layer(model, layer)
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ReslabError(
                f"layer {layer!r} outputs {tuple(getattr(output, 'shape', ()))}, not a feature map; "
                f"use a convolutional layer such as {', '.join(stage_names(model))}"
            )
        captured.append(output)
        # Later in-place ops (ReLU(inplace=True) in the next block) would overwrite the saved maps
        # and invalidate their gradient; the rest of the network runs on a copy instead.
        return output.clone()

    handle = target.register_forward_hook(keep)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # Gradients in the model's own dtype (a bf16 model gets a bf16 input).
            dtype = next(model.parameters()).dtype
            x = x.detach().to(dtype).clone().requires_grad_(True)
            logits = model(x)
            if class_index is None:
                class_index = int(logits[0].argmax())
            (activations,) = captured
            (grads,) = torch.autograd.grad(logits[0, class_index], activations)
    finally:
        handle.remove()
    weights = grads[0].mean(dim=(1, 2))  # equation 1: global average pooled gradients
    cam = F.relu(torch.einsum("k,khw->hw", weights, activations[0].detach()))  # equation 2
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam.clamp_min(0)
    peak = cam.max()
    # A map that is zero everywhere means no region raises the score: show nothing, not noise.
    heatmap = cam / peak if peak > 0 else torch.zeros_like(cam)
    return heatmap.float(), logits.detach().float()[0], class_index


@dataclass
class Explanation:
    """One image explained: what the network predicted and where it looked."""

    image: np.ndarray  # uint8 H x W x 3: the crop the network saw, at display resolution
    heatmap: np.ndarray  # float32 h x w in [0, 1], at the network's input resolution
    class_name: str  # the explained class
    class_index: int
    probability: float  # of the explained class
    top_k: list[tuple[str, float]]  # (class, probability), most probable first
    layer: str

    def overlay(self, alpha: float = 0.45) -> np.ndarray:
        from reslab.plots import heatmap_overlay

        return heatmap_overlay(self.image, self.heatmap, alpha=alpha)


class Explainer:
    """Grad-CAM for a `Predictor`'s model, thread-safe (one explanation at a time per model)."""

    def __init__(self, predictor: Predictor, layer: str | None = None, lock: threading.Lock | None = None):
        if predictor.model is None:
            raise ReslabError("Grad-CAM needs the gradients of a reslab checkpoint, not an exported ONNX/OpenVINO "
                              "file; give the run directory or .safetensors weights")
        self.predictor = predictor
        self.model = predictor.model
        self.layer = layer or default_layer(self.model)
        find_layer(self.model, self.layer)  # refuse a bad --layer before any image is read
        # The forward hook is attached to the shared model, so no other forward may run meanwhile.
        self.lock = lock or threading.Lock()

    def class_index(self, name: str | None) -> int | None:
        if name is None:
            return None
        classes = self.predictor.classes
        if name not in classes:
            shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
            raise ReslabError(f"unknown class {name!r}; this model's classes are: {shown}")
        return classes.index(name)

    def explain(self, image, class_name: str | None = None, top_k: int | None = None) -> Explanation:
        """Explain one image (path or PIL image) for `class_name` or, by default, the top class;
        `top_k` probabilities beside it (None: the Predictor's own top-k)."""
        from reslab.data import preprocess_image

        target = self.class_index(class_name)
        pre = self.predictor.preprocessing
        size = max(DISPLAY_SIZE, int(pre.get("image_size", DISPLAY_SIZE)))
        # The larger decode first: a PIL image decoded once keeps that (JPEG draft) resolution.
        display = preprocess_image(image, image_size=size, in_channels=3, resize=pre.get("resize", "center_crop"))
        batch = self.predictor.load_images([image])
        x = self.predictor.normalize(batch.to(self.predictor.device))
        with self.lock:
            heatmap, logits, index = grad_cam(self.model, x, self.layer, target)
        probs = torch.softmax(logits, dim=0)
        return Explanation(
            image=display.permute(1, 2, 0).numpy(),
            heatmap=heatmap.cpu().numpy(),
            class_name=self.predictor.classes[index],
            class_index=index,
            probability=float(probs[index]),
            top_k=self.predictor.top(probs[None], top_k)[0],
            layer=self.layer,
        )

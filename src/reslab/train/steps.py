"""What one training step and one evaluation pass are, and the optimizer and weight average they use.

    step = make_step(model, build_optimizer(model, cfg), precision="fp32", grad_clip=None, loss_fn=F.cross_entropy)
    loss, correct = step(x, y)
    scores = evaluate(model, loader, "fp32")  # {"loss", "acc", "count", "balanced_accuracy", "macro_f1"}

The training loop (reslab.train.loop), the budget's measurement (reslab.train.budget), the
learning-rate finder and the benchmarks all build their steps here, so they time and run the same
operations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from reslab.checkpoint import unwrap
from reslab.data import balance
from reslab.errors import ReslabError
from reslab.train.config import TrainConfig
from reslab.train.distributed import DistContext


class WeightEMA:
    """An exponential moving average of the weights (Polyak and Juditsky 1992; timm's ModelEmaV2):
    after every step each float tensor of the state dict (BatchNorm statistics included) moves
    towards the model's by 1 - d, with d = min(decay, (1 + step) / (10 + step)) so that the first
    steps do not average in the random initialization for long. A pure function of the steps, so
    its state in last.state.pt resumes it exactly."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for q in self.model.parameters():
            q.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        pairs = [(e, m) for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)]
        floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m.detach() for _, m in floats], 1 - d)
        for e, m in pairs:
            if not e.is_floating_point():
                e.copy_(m)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Groups: weights / norms and biases (fast recipe: no decay, as Goyal et al. 2017 sec. 5.1
    and timm), the classifier at lr * head_lr_mult, and with `layer_decay` < 1 each earlier part of
    the body (stage, stem) at layer_decay times the next one's lr (discriminative fine-tuning, Howard
    and Ruder 2018). Parameters frozen by --freeze are left out."""
    head = {id(p) for p in model.get_classifier().parameters()}
    depth = _depth_below_top(model) if cfg.layer_decay != 1 else {}
    groups: dict[tuple[bool, int, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.no_decay_norm_bias and p.ndim <= 1
        is_head = id(p) in head and cfg.head_lr_mult != 1
        groups.setdefault((is_head, 0 if is_head else depth.get(id(p), 0), no_decay), []).append(p)
    param_groups = []
    for (is_head, below, no_decay), params in sorted(groups.items()):
        lr = cfg.lr * (cfg.head_lr_mult if is_head else cfg.layer_decay**below)
        param_groups.append({"params": params, "lr": lr, "base_lr": lr,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if not param_groups:
        raise ReslabError(f"--freeze {cfg.freeze} leaves no trainable parameter; freeze fewer layers")
    # One fused kernel for all parameters instead of a Python loop over them (CPU and CUDA): ResNet-20's
    # SGD step 1.27 -> 0.21 ms on 1 thread (benchmarks/RESULTS.md, "Training step").
    fused = {"fused": True} if _fusable(param_groups) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=cfg.lr, **fused)


def _fusable(param_groups: list[dict]) -> bool:
    """Whether torch's fused optimizer kernels take these parameters (floating, on the CPU or CUDA)."""
    params = [p for group in param_groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _depth_below_top(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many parts (stages, then the stem) it sits below the last stage."""
    from reslab.transfer import body_parts

    parts = body_parts(model)  # stem, stage 1 .. stage N, then what follows the last stage
    last_stage = max(len(parts) - 2, 0)
    return {id(p): max(last_stage - i, 0) for i, (_, modules) in enumerate(parts) for m in modules
            for p in m.parameters()}


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, grad_clip: float | None,
              loss_fn: Callable) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step as a function `step(x, y) -> (loss, correct)`, both 0-dim tensors on the device.

    Forward under bf16 autocast when `precision == "bf16"` (weights and the optimizer stay fp32),
    `loss_fn(logits, y)`, backward, optional global-norm clipping, step, zero_grad(set_to_none).
    `y` is class indices, or soft targets (N x classes, mixup/cutmix): then `correct` counts the
    predictions of each example's larger share. No `.item()`: the caller decides when to sync.
    """
    device_type = next(model.parameters()).device.type
    autocast = precision == "bf16"
    params = [p for p in model.parameters()]
    # Inception nets with aux_logits return (logits, *aux) in training; the paper weights each
    # auxiliary loss (GoogLeNet 0.3: Szegedy et al. 2014, section 5).
    aux_weights = getattr(unwrap(model), "aux_loss_weights", ())

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            loss = loss_fn(logits.float(), y)
            if isinstance(out, tuple):
                loss = loss + sum(w * loss_fn(a.float(), y) for w, a in zip(aux_weights, out[1:], strict=True))
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), (logits.argmax(1) == (y.argmax(1) if y.dim() > 1 else y)).sum()

    return step


@torch.inference_mode()
def evaluate_sums(model: nn.Module, loader, precision: str, confusion: torch.Tensor | None = None) -> torch.Tensor:
    """[loss sum, correct, count] over a loader (plain cross-entropy), as sums so ranks can add them;
    `confusion` (flat, classes x classes: true class by predicted), when given, gains the pass's counts."""
    model.eval()
    device_type = next(model.parameters()).device.type
    sums = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)
    for x, y in loader:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).float()
        sums += torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=sums.device)])
        if confusion is not None:
            k = logits.shape[1]
            confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
    return sums


def evaluate(model: nn.Module, loader, precision: str, ctx: DistContext | None = None) -> dict[str, float]:
    """{"loss", "acc", "count", "balanced_accuracy", "macro_f1"} over `loader`; with several ranks, over
    all their shards together (the confusion matrix summed over ranks before the scores)."""
    k = unwrap(model).get_classifier().out_features
    confusion = torch.zeros(k * k, dtype=torch.float64, device=next(model.parameters()).device)
    sums = torch.cat([evaluate_sums(model, loader, precision, confusion), confusion]).tolist()
    if ctx is not None:
        sums = list(ctx.all_reduce_sums(dict(enumerate(sums))).values())
    loss, correct, count = sums[:3]
    return {"loss": loss / count, "acc": correct / count, "count": count, **balance.scores(sums[3:], k)}

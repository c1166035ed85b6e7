"""BatchNorm over the global batch on CPUs, where torch.nn.SyncBatchNorm refuses to run.

torch.nn.SyncBatchNorm only accepts GPU (and a few other accelerator) tensors: on a CPU it raises
"SyncBatchNorm expected input tensor to be on GPU or XPU ...". reslab trains on CPU processes too (gloo; the
distributed tests run that way), and `--sync-bn` must mean the same there as on GPUs, so the CPU
gets its own synced BatchNorm here. `convert_sync_batchnorm` picks torch's class where torch
accepts the device and this one elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# Devices whose tensors torch.nn.SyncBatchNorm accepts.
_TORCH_SYNC_BN_DEVICES = ("cuda", "hpu", "xpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients.

    Rank r's loss L_r reaches the other ranks' activations through the shared statistics, so the
    gradient w.r.t. rank r's share is d(sum_q L_q)/d(share_r): the all-reduce of the gradients.
    DDP's averaging then divides by the world size, as torch.nn.SyncBatchNorm's backward does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the global batch for tensors torch.nn.SyncBatchNorm refuses (CPU, gloo).

    BatchNorm's statistics are those of the mini-batch (Ioffe & Szegedy 2015, algorithm 1); with
    the batch split over ranks, syncing them makes N processes compute what one process would on
    the whole batch. Moments are summed in float64 so that E[x^2] - E[x]^2 loses nothing.
    Same parameters, buffers and state-dict keys as nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(x)
        channels = x.shape[1]
        x64 = x.double()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
        moments = torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), count])
        moments = _AllReduceSum.apply(moments)
        n = moments[-1]
        mean = moments[:channels] / n
        var = (moments[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(n.detach()))
        shape = (1, channels, 1, 1)
        y = (x64 - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.double().view(shape) + self.bias.double().view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Running variance is the unbiased estimate, as in nn.BatchNorm2d.
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def convert_sync_batchnorm(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Every trainable BatchNorm2d synced over ranks: torch's SyncBatchNorm on GPUs,
    GlooSyncBatchNorm on CPUs. The parameters and buffers are the same tensors (an optimizer built
    before keeps working); frozen BatchNorm (reslab.transfer's subclass, kept in eval) is left alone.
    """
    cls = nn.SyncBatchNorm if torch.device(device).type in _TORCH_SYNC_BN_DEVICES else GlooSyncBatchNorm
    return _convert(model, cls)


def _convert(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        synced = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert(child, cls))
    return module

"""Several processes, one model: DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPUs).

The trainer runs the same code with one process or many. Under `torchrun` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment) `init()` joins the process group; the
returned `DistContext` then answers "am I rank 0?" (only rank 0 writes the run directory, the
progress bar and the plots), sums metrics over ranks, and keeps decisions (stop early, stop on
NaN) identical on every rank so no rank waits in a collective the others never reach.

Batch semantics: `--batch-size` is the global batch, split evenly over the processes, so N
processes train exactly as one would (with `--sync-bn`, even the BatchNorm statistics are those
of the global batch). `--scale-lr` means instead "the batch and lr were tuned for one process":
the batch is per process and the lr is multiplied by the number of processes, the linear
scaling rule of Goyal et al., "Accurate, Large Minibatch SGD" (2017), section 2.1.

Every collective has a timeout (`--dist-timeout`, else $RESLAB_DIST_TIMEOUT, else 600 s), so a
rank that stops answering ends the job with an error instead of a hang; a rank that *dies* ends
it at once (the torchrun agent stops the others).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reslab.checkpoint import unwrap
from reslab.errors import ReslabError

DEFAULT_TIMEOUT = 600.0  # seconds; NCCL's own default, and far above one epoch's checkpoint write
TIMEOUT_ENV = "RESLAB_DIST_TIMEOUT"
# A test hook: the rank named here raises after a training step (see maybe_inject_crash).
CRASH_ENV, CRASH_STEP_ENV = "RESLAB_TEST_CRASH_RANK", "RESLAB_TEST_CRASH_STEP"
CASUALTY_GRACE = 5.0  # seconds a rank that lost a peer waits before it reports (see session)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Devices whose tensors torch.nn.SyncBatchNorm accepts; elsewhere (CPU with gloo) reslab's own.
_TORCH_SYNC_BN_DEVICES = ("cuda", "hpu", "xpu")


def torchrun_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """rank, world_size, local_rank, master_addr, master_port as torchrun sets them; None outside."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    missing = [k for k in TORCHRUN_ENV if k not in environ]
    if missing:
        raise ReslabError(
            f"RANK/WORLD_SIZE are set but {', '.join(missing)} are not; launch with torchrun "
            "(or `reslab train --nproc N`), or unset RANK and WORLD_SIZE for one process"
        )
    try:
        env = {
            "rank": int(environ["RANK"]),
            "world_size": int(environ["WORLD_SIZE"]),
            "local_rank": int(environ["LOCAL_RANK"]),
            "master_addr": environ["MASTER_ADDR"],
            "master_port": int(environ["MASTER_PORT"]),
        }
    except ValueError:
        raise ReslabError(
            f"torchrun variables must be integers: RANK={environ['RANK']!r} WORLD_SIZE={environ['WORLD_SIZE']!r} "
            f"LOCAL_RANK={environ['LOCAL_RANK']!r} MASTER_PORT={environ['MASTER_PORT']!r}"
        ) from None
    if not 0 <= env["rank"] < env["world_size"]:
        raise ReslabError(f"RANK must be in [0, WORLD_SIZE={env['world_size']}), got {env['rank']}")
    return env


def resolve_timeout(seconds: float | None = None) -> float:
    """The collective timeout in seconds: the argument, else $RESLAB_DIST_TIMEOUT, else 600."""
    source = "--dist-timeout"
    if seconds is None and os.environ.get(TIMEOUT_ENV):
        source, seconds = TIMEOUT_ENV, os.environ[TIMEOUT_ENV]
    if seconds is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ReslabError(f"{source} must be a positive number of seconds, got {seconds!r}")
    return value


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # examples per optimizer step, over all processes
    per_rank_batch: int
    lr: float


def plan_batches(batch_size: int, lr: float, world_size: int, *, scale_lr: bool = False) -> BatchPlan:
    """What `--batch-size`/`--lr` mean on `world_size` processes (see the module docstring)."""
    if batch_size < 1:
        raise ReslabError(f"--batch-size must be at least 1, got {batch_size}")
    if scale_lr:
        # Goyal et al. 2017, section 2.1: "When the minibatch size is multiplied by k, multiply
        # the learning rate by k."
        return BatchPlan(batch_size * world_size, batch_size, lr * world_size)
    if batch_size % world_size:
        raise ReslabError(
            f"--batch-size {batch_size} is the global batch and does not split evenly over {world_size} "
            f"processes; give a multiple of {world_size} (or --scale-lr to make it per process)"
        )
    return BatchPlan(batch_size, batch_size // world_size, lr)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; a default instance is the single-process case."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl", "gloo"; None when no process group was joined
    # Decisions and metric sums are small host values: under NCCL they go through a gloo group on
    # the CPU so that asking them never makes the host wait for the GPU's queue to drain.
    host_group: Any = field(default=None, repr=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, draws progress and plots."""
        return self.rank == 0

    @property
    def _multi(self) -> bool:
        return self.enabled and self.world_size > 1

    def device(self, kind: str | torch.device) -> torch.device:
        """This rank's device of `kind` ("cuda" -> cuda:LOCAL_RANK)."""
        device = torch.device(kind)
        if device.type == "cuda" and device.index is None and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_sums(self, values: Mapping[str, float | int | torch.Tensor]) -> dict[str, float]:
        """Each value summed over ranks (metrics travel as sums and counts, so means stay exact)."""
        packed = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
        if self._multi:
            dist.all_reduce(packed, group=self.host_group)
        return dict(zip(values, packed.tolist(), strict=True))

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: one rank's NaN loss or Ctrl-C stops them all at
        the same step, so no rank is left waiting in a collective the others never reach."""
        if not self._multi:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a decision such as early stopping, a resolved path)."""
        if not self._multi:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def broadcast_state(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's model (e.g. best weights it read back)."""
        if self._multi:
            for tensor in unwrap(model).state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self._multi:
            dist.barrier(group=self.host_group)

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Local rank 0 of each machine runs the block first (a download, a decode cache), the others
        after it, from what it left on disk. Mind the timeout: the others wait in a barrier."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()


def init(device: str | torch.device = "cpu", timeout: float | None = None) -> DistContext:
    """Join torchrun's process group if launched by it (NCCL for CUDA, gloo otherwise).

    Outside torchrun this returns the single-process context and touches nothing. Under torchrun,
    world size 1 included, the group is joined so the same DDP path runs.
    """
    env = torchrun_env()
    if env is None:
        return DistContext()
    seconds = timedelta(seconds=resolve_timeout(timeout))
    if not dist.is_initialized():  # else the caller set the group up itself
        kind = torch.device(device).type
        if kind == "cuda":
            if env["local_rank"] >= torch.cuda.device_count():
                raise ReslabError(
                    f"LOCAL_RANK {env['local_rank']} has no GPU ({torch.cuda.device_count()} visible); "
                    "give torchrun --nproc_per_node at most the number of GPUs"
                )
            torch.cuda.set_device(env["local_rank"])
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=seconds)
    backend = dist.get_backend()
    host_group = dist.new_group(backend="gloo", timeout=seconds) if backend == "nccl" else None
    return DistContext(dist.get_rank(), dist.get_world_size(), env["local_rank"], backend, host_group)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


class CollectiveError(ReslabError):
    """A collective failed on this rank because another rank died or stopped answering.

    Not the root cause (that rank prints its own error), so it is one line with its own exit code,
    which lets `launch` name the rank that really failed.
    """

    exit_code = 3

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


def _collective_failure(err: BaseException, ctx: DistContext, timeout: float) -> CollectiveError | None:
    """The gloo/NCCL error of a lost peer or a timed-out collective, said in one line; else None."""
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and ("gloo" in text or "NCCL" in text))):
        return None
    if "timed out" in text.lower() or "timeout" in text.lower():
        return CollectiveError(
            f"rank {ctx.rank}: a collective operation waited more than {timeout:g} s for another rank; "
            f"see that rank's output, or raise --dist-timeout / ${TIMEOUT_ENV} if a step is that slow",
            timed_out=True,
        )
    return CollectiveError(
        f"rank {ctx.rank}: lost contact with another rank during a collective operation "
        "(it probably failed: its error is printed by it)"
    )


@contextlib.contextmanager
def session(device: str | torch.device = "cpu", timeout: float | None = None) -> Iterator[DistContext]:
    """init() ... shutdown(): the group is torn down even when training raises, and a collective
    broken by another rank's failure becomes a one-line CollectiveError instead of a gloo trace."""
    seconds = resolve_timeout(timeout)
    ctx = init(device, seconds)
    try:
        yield ctx
    except Exception as err:
        failure = _collective_failure(err, ctx, seconds) if ctx.enabled else None
        if failure is None:
            raise
        if not failure.timed_out:
            # Give the launcher time to see the rank that really failed exit first (it then stops
            # this one), so that rank is the one named as the root cause.
            time.sleep(CASUALTY_GRACE)
        raise failure from err
    finally:
        shutdown(ctx)


# --- the model -------------------------------------------------------------------------------


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


def wrap(model: nn.Module, ctx: DistContext, *, sync_bn: bool = False) -> nn.Module:
    """The model as DDP when there is a process group (model already on its device); else as is."""
    if not ctx.enabled:
        return model
    device = next(model.parameters()).device
    if sync_bn and ctx.world_size > 1:
        model = convert_sync_batchnorm(model, device)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_indices(n: int, ctx: DistContext) -> torch.Tensor:
    """Disjoint, unpadded indices of n examples for this rank, for evaluation (sums are reduced
    after the pass, so unequal batch counts are harmless there, and no example counts twice)."""
    return torch.arange(ctx.rank, n, ctx.world_size)


def maybe_inject_crash(ctx: DistContext, step: int = 1) -> None:
    """Test hook: rank $RESLAB_TEST_CRASH_RANK raises after training step $RESLAB_TEST_CRASH_STEP
    (1-based, counted over the whole run; default 1). The crash tests use it; unset, it is inert."""
    target = os.environ.get(CRASH_ENV)
    if target is None or target.strip() != str(ctx.rank):
        return
    at = int(os.environ.get(CRASH_STEP_ENV, "1"))
    if step == at:
        raise RuntimeError(f"crash injected on rank {ctx.rank} at step {step} by {CRASH_ENV}={target}")


# --- launching -------------------------------------------------------------------------------


def run(train: Callable, config: Any, **kwargs: Any) -> dict:
    """`train(config, ctx=..., **kwargs)` in the processes `config` asks for: this one, `config.nproc`
    spawned on this machine (`reslab train --nproc N`), or under torchrun its own rank of the job.

    `config` needs `nproc`, `device` and `dist_timeout` (TrainConfig has them). Spawned ranks
    receive `config` alone: `kwargs` (callbacks) stay in a single process.
    """
    env = torchrun_env()
    if env is None and config.nproc > 1:
        if not config.resume:  # refuse a batch that does not split here, once, not on every rank
            resolved = config.resolve()
            plan_batches(resolved.batch_size, resolved.lr, config.nproc, scale_lr=resolved.scale_lr)
        return launch(config.nproc, train, config)
    if env is not None and config.nproc > 1 and config.nproc != env["world_size"]:
        raise ReslabError(
            f"--nproc {config.nproc} under torchrun, which started {env['world_size']} processes; "
            "drop --nproc (torchrun's --nproc_per_node and --nnodes decide)"
        )
    from reslab.hardware import default_device

    with session(config.device or default_device(), config.dist_timeout) as ctx:
        return train(config, ctx=ctx, **kwargs)


def _rank_entry(fn: Callable, *args: Any) -> Any:
    """Runs in each spawned process and prints its own error, tagged with its rank: a person's error
    as one line (exit code 2 as on the command line), a bug with its traceback (exit code 1)."""
    rank = os.environ.get("RANK", "?")
    try:
        return fn(*args)
    except ReslabError as err:
        print(f"reslab: error on rank {rank}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except Exception:
        print(f"reslab: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(1) from None


def launch(nproc: int, fn: Callable, *args: Any) -> Any:
    """Run `fn(*args)` in `nproc` processes on this machine (torchrun --standalone), return rank 0's
    result. `fn` must be importable (spawned processes import it) and `args` picklable.

    A rank that fails ends the job: the torchrun agent stops the others, the failing rank prints
    its error, and this raises a one-line ReslabError naming that rank.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ReslabError(f"--nproc must be a positive integer, got {nproc!r}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"reslab-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",  # what torchrun --standalone uses: a local store on a free port
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,  # a crashed step is not retried behind the user's back
        monitor_interval=0.1,
        start_method="spawn",
    )
    env = {}
    if "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does: N processes with all cores each would oversubscribe the CPU.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    with _patched_environ(env), _quiet_agent():
        try:
            results = elastic_launch(config, _rank_entry)(fn, *args)
        except ChildFailedError as err:
            rank, failure = _root_failure(err)
            raise ReslabError(
                f"process {rank} of {nproc} failed (exit code {failure.exitcode}); its error is printed above"
            ) from None
    return results[0]


def _root_failure(err) -> tuple[int, Any]:
    """The failing rank that is not just a casualty of another's failure (CollectiveError's code)."""
    failures = sorted(
        err.failures.items(), key=lambda kv: (kv[1].exitcode == CollectiveError.exit_code or kv[1].exitcode < 0, kv[0])
    )
    return failures[0]


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]) -> Iterator[None]:
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    # The agent logs every failed rank's exit status and traceback again; the ranks have already
    # printed their own errors, so only its critical messages stay.
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

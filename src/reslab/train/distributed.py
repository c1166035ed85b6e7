"""Several processes, one model: what reslab adds to torchrun and DistributedDataParallel.

torchrun starts the processes, gives each its RANK, WORLD_SIZE, LOCAL_RANK and a meeting point,
and ends every rank when one fails; `reslab train --nproc N` calls the same launcher through its
Python API (`launch`). What is left to reslab:

- `DistContext`: "am I rank 0?" (only rank 0 writes the run directory, the progress bar and the
  plots), sums of metrics over ranks, and decisions (stop early, stop on NaN) that are identical on
  every rank, so no rank waits in a collective the others never reach;
- batch semantics (`plan_batches`): `--batch-size` is the global batch, split evenly over the
  processes, so N processes train exactly as one would (with `--sync-bn`, even the BatchNorm
  statistics are the global batch's: see reslab.train.sync_bn). `--scale-lr` means instead "the
  batch and lr were tuned for one process": the batch is per process and the lr is multiplied by
  the number of processes, the linear scaling rule of Goyal et al., "Accurate, Large Minibatch
  SGD" (2017), section 2.1;
- a timeout on every collective (`--dist-timeout`, else $RESLAB_DIST_TIMEOUT, else 600 s), so a
  rank that stops answering ends the job with an error instead of a hang;
- one-line errors: a rank that fails records its error in torchrun's error file before its peers
  can notice, and a rank that only lost contact with it says so in one line, so the failing rank
  is the one named.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from reslab.checkpoint import unwrap
from reslab.errors import ReslabError

DEFAULT_TIMEOUT = 600.0  # seconds; NCCL's own default, and far above one epoch's checkpoint write
TIMEOUT_ENV = "RESLAB_DIST_TIMEOUT"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
    """What `--batch-size`/`--lr` mean on `world_size` processes (see the module docstring).
    `batch_size` is already checked (TrainConfig.resolve); whether it splits is checked here."""
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

    def max(self, value: float) -> float:
        """The largest `value` over ranks: an epoch lasts, for the job, as long as its slowest rank's."""
        if not self._multi:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return t.item()

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
        global _joined_group
        _joined_group = True
    backend = dist.get_backend()
    host_group = dist.new_group(backend="gloo", timeout=seconds) if backend == "nccl" else None
    return DistContext(dist.get_rank(), dist.get_world_size(), env["local_rank"], backend, host_group)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


# --- leaving the process ---------------------------------------------------------------------
#
# A process that joined a gloo group must not go through the interpreter's normal exit. The group's
# threads (gloo's TCP loop and its two workers) outlive destroy_process_group: DDP imports
# torch.distributed.nn.functional, whose `group=group.WORLD` default arguments keep the group alive
# for the life of the process. At exit, C++ static destructors then meet threads that the peer's
# closing sockets just woke, and now and then std::terminate aborts the rank (SIGABRT, issue 20).
# Freeing the group first does not help: joining its threads can wait forever when a peer has
# already gone (a fresh-clone CI run hung there). So a rank that is done, its output written and
# flushed, leaves with os._exit: no destructor runs, no thread is joined, the exit status is kept.
# benchmarks/RESULTS.md "DDP teardown" has the measurements.

_joined_group = False  # set by init() when this process itself joined a process group


def joined_group() -> bool:
    """Whether this process joined a process group in init() (torchrun or `--nproc` ranks)."""
    return _joined_group


def end_process(code: int) -> NoReturn:
    """Leave now with exit status `code`, after flushing Python's streams and logs: the end of a
    rank that joined a group (see above). Files reslab writes are closed before this point."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def finish(code: int) -> NoReturn:
    """The command line's exit: end_process for a rank that joined a group, else sys.exit."""
    if _joined_group:
        end_process(code)
    sys.exit(code)


class CollectiveError(ReslabError):
    """A collective failed on this rank because another rank died or stopped answering.

    Not the root cause (that rank prints its own error), so it is one line with its own exit code.
    """

    exit_code = 3


def _collective_failure(err: BaseException, ctx: DistContext, timeout: float) -> CollectiveError | None:
    """The gloo/NCCL error of a lost peer or a timed-out collective, said in one line; else None."""
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and ("gloo" in text or "NCCL" in text))):
        return None
    if "timed out" in text.lower() or "timeout" in text.lower():
        return CollectiveError(
            f"rank {ctx.rank}: a collective operation waited more than {timeout:g} s for another rank; "
            f"see that rank's output, or raise --dist-timeout / ${TIMEOUT_ENV} if a step is that slow"
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
        lost_peer = _collective_failure(err, ctx, seconds) if ctx.enabled else None
        if lost_peer is not None:
            raise lost_peer from err
        if ctx.enabled:
            # Into torchrun's error file ($TORCHELASTIC_ERROR_FILE) *before* the group is torn down
            # below: the other ranks can only notice this failure after that, so the launcher finds
            # this rank's record and names it, whichever rank's exit it happens to see first.
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(err)
        raise
    finally:
        shutdown(ctx)


def wrap(model: nn.Module, ctx: DistContext, *, sync_bn: bool = False,
         find_unused_parameters: bool = False) -> nn.Module:
    """The model as DDP when there is a process group (model already on its device); else as is."""
    if not ctx.enabled:
        return model
    device = next(model.parameters()).device
    if sync_bn and ctx.world_size > 1:
        from reslab.train.sync_bn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model, device)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def shard_indices(n: int, ctx: DistContext) -> torch.Tensor:
    """Disjoint, unpadded indices of n examples for this rank, for evaluation (sums are reduced
    after the pass, so unequal batch counts are harmless there, and no example counts twice)."""
    return torch.arange(ctx.rank, n, ctx.world_size)


# --- launching -------------------------------------------------------------------------------


def run(train: Callable, config: Any, **kwargs: Any) -> dict:
    """`train(config, ctx=..., **kwargs)` in the processes `config` asks for: this one, `config.nproc`
    launched on this machine (`reslab train --nproc N`), or under torchrun its own rank of the job.

    `config` needs `nproc`, `device` and `dist_timeout` (TrainConfig has them). Launched ranks
    receive `kwargs` too (pickled: callbacks must be module-level functions or partials of them).
    """
    env = torchrun_env()
    if env is None and config.nproc > 1:
        if not config.resume:  # refuse a batch that does not split here, once, not on every rank
            resolved = config.resolve()
            plan_batches(resolved.batch_size, resolved.lr, config.nproc, scale_lr=resolved.scale_lr)
        return launch(config.nproc, functools.partial(train, **kwargs), config)
    if env is not None and config.nproc > 1 and config.nproc != env["world_size"]:
        raise ReslabError(
            f"--nproc {config.nproc} under torchrun, which started {env['world_size']} processes; "
            "drop --nproc (torchrun's --nproc_per_node and --nnodes decide)"
        )
    from reslab.hardware import default_device

    with session(config.device or default_device(), config.dist_timeout) as ctx:
        return train(config, ctx=ctx, **kwargs)


def _rank_entry(fn: Callable, *args: Any) -> Any:
    """Runs in each launched process and prints its own error, tagged with its rank: a person's
    error as one line (exit code 2 as on the command line), a bug with its traceback (exit code 1)."""
    rank, world_size = os.environ.get("RANK", "?"), int(os.environ.get("WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does: N processes with all cores each would oversubscribe the CPU.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # The launcher still has to hand the result to the parent after this returns, so the rank
    # cannot leave here; it leaves at the first step of the interpreter's exit instead (atexit runs
    # handlers last-registered first), before any destructor (see end_process).
    try:
        result = fn(*args)
    except ReslabError as err:
        print(f"reslab: error on rank {rank}: {err}", file=sys.stderr, flush=True)
        atexit.register(end_process, err.exit_code)
        raise SystemExit(err.exit_code) from None
    except Exception:
        print(f"reslab: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        atexit.register(end_process, 1)
        raise SystemExit(1) from None
    atexit.register(end_process, 0)
    return result


def launch(nproc: int, fn: Callable, *args: Any) -> Any:
    """Run `fn(*args)` in `nproc` processes on this machine (torchrun --standalone, through its API),
    return rank 0's result. `fn` must be importable (the processes import it) and `args` picklable.

    A rank that fails ends the job: torch's agent stops the others, the failing rank prints its
    error, and this raises a one-line ReslabError naming that rank.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ReslabError(f"--nproc must be a positive integer, got {nproc!r}")
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent keeps each rank's error file under its log folder; its default is a fresh
    # /tmp/torchelastic_* folder per launch that nothing ever removes.
    with tempfile.TemporaryDirectory(prefix="reslab-launch-") as logs, _quiet_agent():
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
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            return elastic_launch(config, _rank_entry)(fn, *args)[0]
        except ChildFailedError as err:
            raise ReslabError(_failure_line(err, nproc, Path(logs))) from None


def _failure_line(err: Any, nproc: int, logs: Path) -> str:
    # The agent reports the first exit it sees, which may be a rank that only lost contact; the
    # rank that failed is the one that left an error file (see session).
    recorded = sorted(int(path.parent.name) for path in logs.glob("*/attempt_*/*/error.json"))
    if recorded:
        return f"process {recorded[0]} of {nproc} failed; its error is printed above"
    rank, failure = min(err.failures.items())
    return f"process {rank} of {nproc} failed (exit code {failure.exitcode}); its error is printed above"


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    # The agent logs every failed rank's exit status and traceback again, after the rank printed
    # its own error. LaunchConfig has no option for that, and torch reads $LOGLEVEL only when it
    # first imports these modules, so their levels are set here for the launch.
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

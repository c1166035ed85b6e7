"""reslab.train.distributed and sync_bn: torchrun's environment, batch/lr semantics, CPU SyncBatchNorm, the launcher.

The multi-process tests spawn 2 CPU processes with gloo on 127.0.0.1 (a few seconds each on a quiet
machine, most of it importing torch twice).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from reslab.checkpoint import unwrap
from reslab.errors import ReslabError
from reslab.train import distributed as D
from reslab.train.sync_bn import GlooSyncBatchNorm, convert_sync_batchnorm

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_torchrun_env_is_read_and_checked():
    assert D.torchrun_env({}) is None
    assert D.torchrun_env(TORCHRUN) == {
        "rank": 1,
        "world_size": 2,
        "local_rank": 1,
        "master_addr": "127.0.0.1",
        "master_port": 29500,
    }
    with pytest.raises(ReslabError, match="MASTER_ADDR"):
        D.torchrun_env({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"})
    with pytest.raises(ReslabError, match="'one'"):
        D.torchrun_env({**TORCHRUN, "RANK": "one"})
    with pytest.raises(ReslabError, match="got 2"):
        D.torchrun_env({**TORCHRUN, "RANK": "2"})


def test_init_outside_torchrun_is_single_process(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    with D.session("cpu") as ctx:
        assert ctx == D.DistContext() and not ctx.enabled and ctx.is_main
        assert ctx.all_reduce_sums({"loss": 2.5, "n": 3}) == {"loss": 2.5, "n": 3.0}
        assert ctx.any(True) and not ctx.any(False)
        assert ctx.broadcast({"stop": True}) == {"stop": True}
        ctx.barrier()
        model = nn.Linear(2, 2)
        assert D.wrap(model, ctx, sync_bn=True) is model and unwrap(model) is model
        assert ctx.device("cuda") == torch.device("cuda")  # no rank index without a process group


def test_timeout_from_argument_env_or_default(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.resolve_timeout() == D.DEFAULT_TIMEOUT == 600
    monkeypatch.setenv(D.TIMEOUT_ENV, "45")
    assert D.resolve_timeout() == 45
    assert D.resolve_timeout(7) == 7
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(ReslabError, match=r"RESLAB_DIST_TIMEOUT.*'soon'"):
        D.resolve_timeout()
    with pytest.raises(ReslabError, match="--dist-timeout.*-1"):
        D.resolve_timeout(-1)


def test_batch_size_is_global_unless_scale_lr():
    assert D.plan_batches(128, 0.1, 4) == D.BatchPlan(global_batch=128, per_rank_batch=32, lr=0.1)
    assert D.plan_batches(128, 0.1, 1) == D.BatchPlan(128, 128, 0.1)
    with pytest.raises(ReslabError, match="--batch-size 130 .* multiple of 4"):
        D.plan_batches(130, 0.1, 4)
    # Linear scaling (Goyal et al. 2017): per-process batch, lr times the number of processes.
    assert D.plan_batches(130, 0.1, 4, scale_lr=True) == D.BatchPlan(520, 130, pytest.approx(0.4))


def test_shards_for_evaluation_are_disjoint_and_complete():
    shards = [D.shard_indices(11, D.DistContext(rank=r, world_size=3, backend="gloo")) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False),
        nn.BatchNorm2d(4, momentum=None),  # the cumulative-average form too
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def test_cpu_sync_batchnorm_conversion_keeps_state_and_equals_batchnorm_alone():
    model = _net()
    model[1].running_mean.fill_(0.5)
    model[1].weight.requires_grad_(False)
    model.eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    x = torch.randn(4, 3, 6, 6)
    expected = model(x)
    converted = convert_sync_batchnorm(model, "cpu")
    assert [type(m) for m in converted.modules()].count(GlooSyncBatchNorm) == 2
    assert not converted[1].weight.requires_grad and not converted.training
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))  # an optimizer still holds them
    assert converted.state_dict().keys() == reference.keys()
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in reference.items())
    torch.testing.assert_close(converted(x), expected)
    # Without a process group it is plain BatchNorm, in training mode as well.
    bn, synced = nn.BatchNorm2d(4).train(), GlooSyncBatchNorm(4).train()
    x4 = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(synced(x4), bn(x4))
    torch.testing.assert_close(synced.running_var, bn.running_var)
    # reslab.transfer's frozen BatchNorm stays frozen (and unsynced).
    from reslab.transfer import FrozenBatchNorm2d

    frozen = _net()
    frozen[1].__class__ = FrozenBatchNorm2d
    assert type(convert_sync_batchnorm(frozen, "cpu")[1]) is FrozenBatchNorm2d


# --- two processes ---------------------------------------------------------------------------


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g) * 3 + 1, torch.randint(0, 3, (8,), generator=g)


def _sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


def _train_shard() -> dict:
    """Each rank trains on its half of one global batch, with SyncBatchNorm, under DDP."""
    with D.session("cpu", timeout=60) as ctx:
        x, y = _data()
        mine = D.shard_indices(len(x), ctx)
        model = D.wrap(_net(), ctx, sync_bn=True)
        state = _sgd_steps(model, x[mine], y[mine])
        return {
            "state": state,
            "sums": ctx.all_reduce_sums({"rank": ctx.rank, "n": 1}),
            "any": ctx.any(ctx.rank == 1),
            "broadcast": ctx.broadcast(f"from rank {ctx.rank}"),
            "world_size": ctx.world_size,
            "norm": type(unwrap(model)[1]).__name__,
        }


@pytest.mark.slow
def test_two_processes_with_sync_batchnorm_equal_one_process_on_the_global_batch():
    got = D.launch(2, _train_shard)
    assert got["world_size"] == 2 and got["norm"] == "GlooSyncBatchNorm"
    assert got["sums"] == {"rank": 1.0, "n": 2.0}
    assert got["any"] is True and got["broadcast"] == "from rank 0"
    x, y = _data()
    expected = _sgd_steps(_net(), x, y)
    assert got["state"].keys() == expected.keys()
    for key, value in expected.items():
        # Gradients and BatchNorm statistics (running ones included) are the global batch's.
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert not torch.equal(expected["0.weight"], _net().state_dict()["0.weight"])  # it did train


def _crash_on_rank_1(slow_exit: float = 0.0) -> int:
    try:
        with D.session("cpu", timeout=60) as ctx:
            ctx.barrier()
            if ctx.rank == 1:
                raise RuntimeError("crash on rank 1")
            ctx.barrier()  # rank 0 waits here for a rank that is gone
            return ctx.rank
    finally:
        if os.environ["RANK"] == "1":
            # The failing rank is still exiting when rank 0, which lost contact, has exited.
            time.sleep(slow_exit)


@pytest.mark.slow
def test_a_crash_on_one_rank_ends_the_job_naming_it(capfd):
    start = time.monotonic()
    with pytest.raises(ReslabError, match="process 1 of 2 failed"):
        D.launch(2, _crash_on_rank_1)
    assert time.monotonic() - start < 60  # well inside the 60 s collective timeout
    err = capfd.readouterr().err
    assert "reslab: rank 1 failed:" in err and "RuntimeError: crash on rank 1" in err
    assert not re.search(r"(?m)^[EWI]\d{4} ", err), err  # none of the agent's log lines ("E1123 18:58:21 ...")


@pytest.mark.slow
def test_the_failing_rank_is_named_even_when_its_peer_exits_first(capfd):
    # The launcher sees rank 0's exit first (it lost contact), yet names rank 1, whose error it recorded.
    with pytest.raises(ReslabError, match="process 1 of 2 failed"):
        D.launch(2, _crash_on_rank_1, 3.0)
    assert "rank 0: lost contact with another rank" in capfd.readouterr().err


# Issue 20: a rank that joined a gloo group aborted now and then at the interpreter's exit (the
# group's threads outlive it and meet the C++ destructors). A rank now leaves with os._exit once its
# work is done and flushed: the proof that it does is that no exit-time handler registered before
# that point runs. benchmarks/bench_ddp_loop.py loops the real commands.

_FINISH = """
import atexit, sys
from reslab.train import distributed as D
D._joined_group = {joined}
atexit.register(lambda: print("finalized", flush=True))
print("output kept", end="")
D.finish(3)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_the_command_line_exit_skips_finalization_only_in_a_rank(joined):
    done = subprocess.run([sys.executable, "-c", _FINISH.format(joined=joined)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3
    assert done.stdout == ("output kept" if joined else "output kept" + "finalized\n"), done.stdout


def _register_exit_marker(marker: str) -> int:
    import atexit

    # Registered inside the rank's work: it would run at a normal exit, after the launcher's own handler.
    atexit.register(Path(f"{marker}.{os.environ['RANK']}").write_text, "finalized")
    return int(os.environ["RANK"]) + 40


@pytest.mark.slow
def test_launched_ranks_return_their_result_and_leave_without_finalization(tmp_path):
    marker = tmp_path / "exit"
    assert D.launch(2, _register_exit_marker, str(marker)) == 40  # rank 0's result still reaches the caller
    assert not list(tmp_path.glob("exit.*"))


def test_launch_refuses_a_bad_process_count():
    with pytest.raises(ReslabError, match="--nproc .* got 0"):
        D.launch(0, _crash_on_rank_1)


_SUMMARY = {"model": "resnet20", "data": "digits", "epochs": 2, "train_seconds": 8.2, "images_per_second": 3658.5,
            "best_val_acc": 0.9, "test_acc": 0.9, "run_dir": "runs/r", "interrupted": False, "best_weights": "model"}


@pytest.mark.parametrize("interrupted", [False, True])
def test_under_torchrun_rank_0_alone_prints_the_jobs_end_lines(monkeypatch, capsys, interrupted):
    import reslab.train
    from reslab.cli import main

    # Every rank's train() returns the job's summary (time and images over all ranks); the command
    # runs on every rank, and only rank 0 may print it.
    monkeypatch.setattr(reslab.train, "train", lambda config: {**_SUMMARY, "interrupted": interrupted})
    printed = {}
    for rank in ("1", "0"):
        for key, value in {**TORCHRUN, "RANK": rank, "LOCAL_RANK": rank}.items():
            monkeypatch.setenv(key, value)
        assert main(["train", "--epochs", "2"]) == (130 if interrupted else 0)
        printed[rank] = capsys.readouterr()
    assert printed["1"].out == printed["1"].err == ""
    if interrupted:
        assert printed["0"].out == "" and printed["0"].err.count("interrupted; checkpoint written") == 1
    else:
        assert printed["0"].out.splitlines() == [
            "resnet20 on digits: 2 epochs in 8.2s on 2 processes (3658.5 img/s), best val acc 90.00%, "
            "test acc 90.00%; run in runs/r"]


def test_one_process_prints_its_end_line_as_before(monkeypatch, capsys):
    import reslab.train
    from reslab.cli import main

    monkeypatch.setattr(reslab.train, "train", lambda config: dict(_SUMMARY))
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    assert main(["train", "--epochs", "2"]) == 0
    assert capsys.readouterr().out == ("resnet20 on digits: 2 epochs in 8.2s (3658.5 img/s), best val acc 90.00%, "
                                       "test acc 90.00%; run in runs/r\n")

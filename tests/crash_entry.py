"""`reslab train ARGS...` in which rank RANK raises after step STEP of epoch EPOCH: a crash for tests.

    torchrun --nproc_per_node 2 tests/crash_entry.py RANK EPOCH STEP train --data ... --out RUN

The crash goes in through train()'s `stop(epoch, step)` callback (asked after every step, on every
rank), so reslab's own loop carries no test hook.
"""

from __future__ import annotations

import os
import sys

from reslab.cli import build_parser
from reslab.cli.train import config_from_args
from reslab.errors import ReslabError
from reslab.train import train


def main(argv: list[str]) -> int:
    rank, epoch, step = (int(v) for v in argv[:3])

    def crash(at_epoch: int, at_step: int) -> bool:
        if int(os.environ.get("RANK", "0")) == rank and (at_epoch, at_step) == (epoch, step):
            raise RuntimeError(f"crash injected on rank {rank} at epoch {epoch}, step {step}")
        return False

    try:
        train(config_from_args(build_parser().parse_args(argv[3:])), stop=crash)
    except ReslabError as err:  # as reslab's command line prints it: one line
        print(f"crash_entry: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

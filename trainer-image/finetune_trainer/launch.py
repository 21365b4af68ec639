"""torchrun, with the trainer's exit codes: `python -m finetune_trainer.launch <torchrun arguments>`.

torchrun exits 1 whatever its workers exited with, which would hide a configuration error (42) from
the Job's podFailurePolicy and retry a run that can only fail again. This runs torchrun's own entry
point and exits with the code that matters: 42 if any process had a configuration error, else the
first failed process's code (a signal as 128 + n, as a container reports it).
"""

from __future__ import annotations

import sys

from finetune_api import contract


def exit_code(codes: list[int]) -> int:
    if not codes:
        return 1
    if contract.EXIT_CONFIG_ERROR in codes:
        return contract.EXIT_CONFIG_ERROR
    code = codes[0]
    return 128 - code if code < 0 else code or 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())  # by global rank
        return exit_code([f.exitcode for _, f in failures])
    return contract.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

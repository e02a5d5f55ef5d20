"""`llama-train run --nproc N`: start N ranks on this machine through torchrun.

torchrun's standalone rendezvous on a free local port, preemption signals
forwarded to the workers, and the workers' exit code (3 = preempted) returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from types import FrameType

from llama_train.core.distributed import PREEMPTED_EXIT_CODE, PREEMPTION_SIGNALS


def launch_torchrun(nproc: int, arguments: Sequence[str]) -> int:
    """Run ``torchrun --standalone --nproc-per-node N -m llama_train ARGUMENTS``; its exit code.

    This process becomes torchrun's agent (torch.distributed.run, one node,
    rendezvous on a free local port). SIGTERM and SIGUSR1 sent to it are
    forwarded to the workers, which save and exit with the preemption code;
    torchrun itself would stop them with SIGTERM and SIGKILL 30 s later, and
    ignores SIGUSR1 (which would kill this process and orphan them).

    Returns 0 on success; 3 when a worker exited 3 (preempted) and none with
    another error code: a worker exits 3 only once the checkpoint is
    published on every rank, and torchrun then stops the others with a
    signal, whose deaths are part of that shutdown. Otherwise the first
    failing worker's code (1 for one killed by a signal).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's agent turns the signals it handles into "stop every worker now"; we keep
    # SIGTERM (and SIGUSR1, which it never handles) to forward them ourselves. Recent torch
    # takes the list as an option, older torch from the environment.
    agent_signals = "SIGINT,SIGHUP,SIGQUIT"
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = agent_signals
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, stated (no warning)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    parser = get_args_parser()
    options = ["--standalone", f"--nproc-per-node={nproc}"]
    if "--signals-to-handle" in parser._option_string_actions:
        options.append(f"--signals-to-handle={agent_signals}")
    args = parser.parse_args([*options, "-m", "llama_train", *arguments])
    previous = {sig: signal.signal(sig, _forward_to_workers) for sig in PREEMPTION_SIGNALS}
    try:
        run(args)
    except ChildFailedError as error:
        codes = [failure.exitcode for _, failure in sorted(error.failures.items())]
        errors = [code for code in codes if code > 0 and code != PREEMPTED_EXIT_CODE]
        if PREEMPTED_EXIT_CODE in codes and not errors:
            return PREEMPTED_EXIT_CODE
        return errors[0] if errors else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _forward_to_workers(signum: int, frame: FrameType | None) -> None:
    """Send a preemption signal on to this launcher's worker processes (its children)."""
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)

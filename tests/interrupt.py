"""Kill a workbench command at a chosen moment, from inside its own process (tests only).

A moment is the N-th event of one kind while the command runs:

- ``forward``: a module's forward is called (any layer of any batch, model loading excluded);
- ``written``: a temporary output or checkpoint file is complete, just before its fsync and rename;
- ``renamed``: just after a finished file was renamed into place (before the next one is written).

:class:`Moments` counts the events of a whole run, or sends SIGKILL to its own process at the chosen
one: nothing (no ``finally``, no ``atexit``) runs after it, as when the machine kills a job.
:func:`run_killed` runs ``workbench.cli.main(argv)`` in a forked child that way.

Run as a script (under torchrun) it runs the command lines listed in a JSON file, one after the other
in the same process group: ``[{"argv": [...], "kill": [rank, event, n] or null}, ...]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

import torch

EVENTS = ("forward", "written", "renamed")


class Moments:
    def __init__(self, kill: tuple[str, int] | None = None):
        self.counts = dict.fromkeys(EVENTS, 0)
        self.kill = tuple(kill) if kill else None

    def _event(self, kind: str) -> None:
        self.counts[kind] += 1
        if self.kill == (kind, self.counts[kind]):
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def watch(self):
        """Count (and maybe kill at) events while the block runs."""
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self._event("written")
            return real_fsync(fd)

        def replace(src, dst):
            real_replace(src, dst)
            self._event("renamed")

        hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: self._event("forward"))
        os.fsync, os.replace = fsync, replace  # workbench.io.atomic_path calls os.fsync, then os.replace
        try:
            yield self
        finally:
            hook.remove()
            os.fsync, os.replace = real_fsync, real_replace


def run_killed(argv: list[str], kill: tuple[str, int], timeout: float = 300) -> int:
    """Run the CLI in a forked child that SIGKILLs itself at ``kill``; return its wait status.

    The child inherits the loaded modules (no start-up cost) and the parent's torch thread count.
    """
    from workbench.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            with Moments(kill).watch():
                code = main(list(argv))
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"{argv} did not end within {timeout} s")
        time.sleep(0.01)


def killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


if __name__ == "__main__":  # torchrun driver: every rank runs the listed commands in order
    import torch.distributed as dist

    from workbench import distributed
    from workbench.cli import main

    # One process group for all the commands: destroying the default group and making it again from
    # torchrun's store can hang the next rendezvous, and one launch per command costs ~15 s.
    distributed.finish = lambda shard: None
    rank = int(os.environ.get("RANK", "0"))
    for job in json.loads(open(sys.argv[1]).read()):
        kill = job.get("kill")
        with Moments(kill[1:] if kill and kill[0] == rank else None).watch():
            code = main(job["argv"])
        if code != 0:
            sys.exit(code)
    if dist.is_initialized():
        dist.destroy_process_group()

"""Launching a script on several processes (torchrun or accelerate launch) for the tests.

On the 2-core CPU machine a gloo worker sometimes dies inside the C++ runtime with SIGABRT
and no Python error ("terminate called without an active exception", or nothing at all);
its peer then fails with "Connection closed by peer". Seen about once in 40 launches, on
every scenario, and never twice in a row (24 reruns of such a launch passed). A launch
where a worker died of a signal is therefore run once more, on a fresh port; any other
failure, and a second abort, fail the test with the launcher's output.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# torchrun's summary of a worker killed by a signal: "exitcode  : -6 (pid: ...)" / "Signal 6 (SIGABRT)"
_KILLED_BY_SIGNAL = re.compile(r"exitcode\s*:\s*-(?:6|11)\b|Signal (?:6|11) \((?:SIGABRT|SIGSEGV)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> Callable[[int], list[str]]:
    """The torchrun command line for ``nproc`` processes on a given port."""
    return lambda port: [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(port),
    ]


def accelerate_launch(config: Path) -> Callable[[int], list[str]]:
    """The ``accelerate launch`` command line with a config file, on a given port."""
    return lambda port: [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(port),
    ]


def killed_by_signal(output: str) -> bool:
    return bool(_KILLED_BY_SIGNAL.search(output)) or "terminate called without an active exception" in output


def run(
    launcher: Callable[[int], list[str]], args: list[str], timeout: int = 300, cwd: Path | None = None, **env_vars: str
) -> subprocess.CompletedProcess:
    """Run ``launcher(port) + args`` with the repository on PYTHONPATH and one thread per process;
    asserts it exits 0, retrying once a launch in which a worker was killed by a signal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_vars}
    for attempt in range(2):
        proc = subprocess.run([*launcher(free_port()), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        if proc.returncode == 0 or attempt == 1 or not killed_by_signal(proc.stdout + proc.stderr):
            break
        warnings.warn(f"a worker was killed by a signal in the runtime; launching {args} once more")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc

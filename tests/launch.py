"""`accelerate launch` of two CPU processes, for the tests of multi-process runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def launch_two_processes(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    """`accelerate launch` two CPU processes on a free port; kill every rank if it hangs."""
    with socket.socket() as probe:  # a free rendezvous port: never collide with another run's 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", *arguments]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # never leave rank processes behind
        stdout, stderr = process.communicate()
        pytest.fail("two-process run did not finish in 180 s:\n" + stderr[-3000:])
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

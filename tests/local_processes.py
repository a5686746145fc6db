"""Jobs of several local processes for the multi-process tests: a free coordinator port, and running the processes
to the end with every one's output checked."""

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], envs: list[dict], *, timeout: float, cwd=None) -> list[str]:
    """Starts one process per (command, env), waits for all, and returns their combined outputs; fails with the
    output of the first process that exited non-zero."""
    procs = [subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for command, env in zip(commands, envs, strict=True)]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:  # one failed process leaves the others waiting for it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} of {len(procs)} failed:\n{output[-5000:]}"
    return outputs

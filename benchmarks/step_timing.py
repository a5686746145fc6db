"""How the benchmarks time the trainer's jitted step: back to back as the trainer runs it, and one call at a time."""

import statistics
import time

import jax

WARMUP_S = 2.0


def time_step_calls(call, state, calls: int, windows: int = 3, warmup_s: float = WARMUP_S):
    """Times `call(state) -> (state, metrics)`, a compiled train-step call that donates `state`.

    First the calls run back to back, untimed, for at least `warmup_s` seconds. Without that, the first case of a
    machine start (DiG-S/2, 2026-12-03, H200) timed 11.4 ms per step right after compiling, where the same model's
    step timed after a training run (train_loop.py) took 8.0 ms: a GPU coming out of idle is the suspected cause.

    Returns (state, metrics, pipelined, synchronous), seconds per call:
      pipelined: `calls` calls dispatched back to back and waited for once, as the trainer runs them (the host
        dispatches call i + 1 while the device runs call i); the median over `windows` windows.
      synchronous: every call waited for, which adds the host's dispatch time and the launch gap to each; the
        median over all such calls.
    The two modes alternate in windows so that slow drifts (clocks, temperature) affect both alike.
    """
    started = time.perf_counter()
    while time.perf_counter() - started < warmup_s:
        for _ in range(calls):
            state, metrics = call(state)
        jax.block_until_ready(metrics)
    pipelined, synchronous = [], []
    for _ in range(windows):
        for _ in range(calls):
            started = time.perf_counter()
            state, metrics = call(state)
            jax.block_until_ready(metrics)
            synchronous.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(calls):
            state, metrics = call(state)
        jax.block_until_ready(metrics)
        pipelined.append((time.perf_counter() - started) / calls)
    return state, metrics, statistics.median(pipelined), statistics.median(synchronous)


def time_calls(fn, *args, target_s: float = 0.05, repeats: int = 5) -> float:
    """Median milliseconds per call of a jitted, stateless fn(*args): compiled and warmed up first, then `repeats`
    windows of back-to-back calls waited for once (dispatch overlaps execution), each window ~target_s long."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(3, min(200, int(target_s / max(time.perf_counter() - start, 1e-6))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return 1e3 * statistics.median(samples)

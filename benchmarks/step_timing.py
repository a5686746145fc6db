"""How the benchmarks time the trainer's jitted step: back to back as the trainer runs it, and one call at a time."""

import statistics
import time

import jax


def time_step_calls(call, state, calls: int, windows: int = 3):
    """Times `call(state) -> (state, metrics)`, a compiled train-step call that donates `state`.

    Returns (state, metrics, pipelined, synchronous), seconds per call:
      pipelined: `calls` calls dispatched back to back and waited for once, as the trainer runs them (the host
        dispatches call i + 1 while the device runs call i); the median over `windows` windows.
      synchronous: every call waited for, which adds the host's dispatch time and the launch gap to each; the
        median over all such calls.
    The two modes alternate in windows so that slow drifts (clocks, temperature) affect both alike.
    """
    pipelined, synchronous = [], []
    metrics = None
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

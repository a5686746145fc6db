"""Training logs: a console progress line with throughput and ETA, TensorBoard scalars and a metrics.jsonl."""

import json
import os
import time

from tensorboardX import SummaryWriter

from dig_jax.images import atomic_write_bytes


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Writes scalars every `log_every` steps; only the main process writes anything.

    Throughput (steps/s, images/s) is measured between consecutive `write` calls, so the first interval after a
    (re)start, which includes compilation, is reported but not used for the ETA. "data_time_fraction" is the share
    of that interval the loop spent getting its batches (`count_data_time`): near 0 when the input pipeline keeps
    up, and the share of the time it costs when it does not.
    """

    def __init__(self, workdir: str, *, start_step: int, total_steps: int, global_batch_size: int, is_main: bool):
        """start_step: the step training (re)starts from; metrics.jsonl lines of later steps, logged by a run that
        stopped before it saved them, are dropped, so that every step appears once."""
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.is_main = is_main
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._data_seconds = 0.0  # since the last `write`
        self._steps_per_second = None
        if is_main:
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
            path = os.path.join(workdir, "metrics.jsonl")
            drop_lines_after(path, start_step)
            self._jsonl = open(path, "a")

    def count_data_time(self, seconds: float) -> None:
        """Adds time the training loop spent getting its next batches (waiting for them, placing them)."""
        self._data_seconds += seconds

    def write(self, step: int, scalars: dict) -> dict:
        """Logs `scalars` (floats) at `step` (the number of completed steps); returns them with throughput."""
        now = time.perf_counter()
        elapsed, steps = now - self._last_time, step - self._last_step
        scalars = dict(scalars)
        if steps > 0 and elapsed > 0:
            scalars["steps_per_second"] = steps / elapsed
            scalars["images_per_second"] = steps * self.global_batch_size / elapsed
            scalars["data_time_fraction"] = self._data_seconds / elapsed
            if self._steps_per_second is not None:  # skip the interval that included compilation
                eta = (self.total_steps - step) / scalars["steps_per_second"]
                scalars["eta_seconds"] = eta
            self._steps_per_second = scalars["steps_per_second"]
        self._last_step, self._last_time, self._data_seconds = step, now, 0.0
        if self.is_main:
            self._print(step, scalars)
            for name, value in scalars.items():
                self._tensorboard.add_scalar(f"train/{name}", value, step)
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self._jsonl.flush()
        return scalars

    def write_eval(self, step: int, scalars: dict) -> None:
        """Logs evaluation scalars (e.g. FID) at `step` as eval/<name> in TensorBoard and metrics.jsonl.

        Their "seconds" (the evaluation's duration) are left out of the training throughput and ETA.
        """
        self._last_time += scalars.get("seconds", 0.0)
        if not self.is_main:
            return
        print(f"eval step {step} | " + " | ".join(f"{name} {value:.4g}" for name, value in scalars.items()),
              flush=True)
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"eval/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, **{f"eval/{name}": v for name, v in scalars.items()}}) + "\n")
        self._jsonl.flush()

    def _print(self, step: int, s: dict) -> None:
        parts = [f"step {step}/{self.total_steps}", f"loss {s['loss']:.4f}", f"mse {s['mse']:.4f}",
                 f"vb {s['vb']:.4f}", f"|g| {s['grad_norm']:.3f}", f"lr {s['learning_rate']:.2e}"]
        if "steps_per_second" in s:
            parts += [f"{s['steps_per_second']:.2f} steps/s", f"{s['images_per_second']:.1f} img/s",
                      f"data {100 * s['data_time_fraction']:.0f}%"]
        if "eta_seconds" in s:
            parts.append(f"ETA {format_duration(s['eta_seconds'])}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.is_main:
            self._tensorboard.close()
            self._jsonl.close()


def drop_lines_after(path: str, step: int) -> None:
    """Rewrites the metrics.jsonl at `path` (atomically) without the lines of steps after `step`, if it has any."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        atomic_write_bytes(path, "".join(kept).encode())

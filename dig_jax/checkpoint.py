"""Checkpoints of a training run: train state (orbax, async, keep-N) and each host's data-loader position.

Layout under the run's workdir:
  config.json                  the run's config (checked against new starts once a checkpoint exists; rewritten
                               atomically at every start, after the restore)
  checkpoints/<step>/state     {"step", "params", "opt_state", "ema", "rng"} (orbax, sharded arrays)
  checkpoints/<step>/data      one JSON per process: its loader's position
Orbax writes each step to a temporary folder and renames it when complete, so a crash mid-save leaves the
previous checkpoints intact.
"""

import json
import os

import grain
import orbax.checkpoint as ocp

from dig_jax.images import atomic_write_bytes


class CheckpointError(RuntimeError):
    """A checkpoint could not be used; the message says which one and what to do."""


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, loader=None) -> None:
        """Starts saving `state` (and the loader's position) as `step`; returns before the write finishes."""
        items = {"state": ocp.args.StandardSave(state)}
        if loader is not None:
            items["data"] = grain.checkpoint.CheckpointSave(loader)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: dict, loader=None) -> dict:
        """Restores `step` into the structure, dtypes and shardings of `abstract_state` (and the loader)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if loader is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(loader)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except Exception as error:  # orbax raises many types for unreadable or mismatched files
            raise CheckpointError(
                f"checkpoint {os.path.join(self.directory, str(step))} could not be restored: "
                f"{type(error).__name__}: {error}\nIt was left untouched. If it belongs to another model or "
                f"config, train in a new --workdir; if it is damaged, move that step folder away to resume from "
                f"the previous one.") from error

    def restore_ema(self, step: int, abstract_ema) -> dict:
        """Restores only the EMA weights of `step` (what sampling needs)."""
        restore_args = ocp.checkpoint_utils.construct_restore_args({"ema": abstract_ema})
        args = ocp.args.PyTreeRestore(item={"ema": abstract_ema}, restore_args=restore_args, partial_restore=True)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]["ema"]
        except Exception as error:
            raise CheckpointError(
                f"EMA weights of checkpoint {os.path.join(self.directory, str(step))} could not be restored: "
                f"{type(error).__name__}: {error}") from error

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished checkpoint (orbax renames a step's folder to <step> once it is complete)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_run_config(workdir: str, config_json: str) -> None:
    """Refuses a config whose model or data differ from those of the run that wrote `workdir`'s checkpoints (the
    state would not fit). Without a checkpoint any config is fine: a start that failed left nothing it must stay
    compatible with. Keys the recorded config lacks (options added to the code after the run started) are not
    compared: the restore checks what they change (e.g. a data position written by the other reader)."""
    path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and has_checkpoint(workdir)):
        return
    previous = read_run_config(workdir)
    current = json.loads(config_json)
    for section in ("model", "data"):
        before, now = previous.get(section) or {}, current.get(section) or {}
        changed = [f"config.{section}.{key}={before.get(key)!r} then, {now.get(key)!r} now"
                   for key in sorted(before) if before[key] != now.get(key)]
        if changed:
            raise CheckpointError(
                f"{path} records a run with a different config.{section} ({'; '.join(changed)}); its "
                f"checkpoints are not compatible. Use a new --workdir, or the same config to resume.")


def write_run_config(workdir: str, config_json: str) -> None:
    """Records the run's config (atomically). Call it once `check_run_config` passed and a checkpoint, if any, was
    restored with it: a config whose restore failed is not recorded."""
    atomic_write_bytes(os.path.join(workdir, "config.json"), config_json.encode())


def read_run_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found: is {workdir} the --workdir of a training run?")
    with open(path) as f:
        return json.load(f)

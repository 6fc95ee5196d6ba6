"""Checkpoints of a training run: `workdir/checkpoints`, resumed after an interruption.

    checkpoints/state.json     the run's state: next epoch, stage, best mAP, history; it names
                               the last and the best checkpoint: `last-<epoch>`, `best-<epoch>`
    checkpoints/last/, best/   `tf.train.CheckpointManager` folders (ckpt-<epoch>.index, .data)

Each checkpoint holds the training model's weights and its optimizer's variables. The managers
keep two checkpoints each and state.json is replaced atomically after them, so the checkpoint it
names always exists: a run killed at any moment resumes from its last complete epoch.

Workdirs of earlier versions (state version 1) hold each named checkpoint as a folder of that
name with a Keras `model.weights.h5`; those still resume (read with `load_weights`), and
finished ones are still recognised as finished (model.json and the state are unchanged).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import keras
import tensorflow as tf

from cbir_tf import fileio
from cbir_tf.train.settings import Settings

STATE_VERSION = 2
_LEGACY_WEIGHTS = "model.weights.h5"  # inside a `last-NNNNN` folder of a version 1 state
# Settings that choose how a run executes, not what it learns: a finished run is the same run
# whatever they are now.
_EXECUTION_SETTINGS = frozenset({"cache", "mixed_precision", "strategy"})


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of another backbone, recipe, pooling or class list."""


def new_state(settings: Settings, class_names: list[str], off_the_shelf_map: float | None):
    """The state of a run that has not trained an epoch yet."""
    return {
        "version": STATE_VERSION,
        "identity": settings.identity(),
        "class_names": list(class_names),
        "next_epoch": 0,
        "stage": 1,
        "best_map": None,
        "best_epoch": None,
        "best_kind": None,
        "off_the_shelf_val_map": off_the_shelf_map,
        "epochs_without_improvement": 0,
        "history": [],
        "train_seconds": 0.0,
        "finished": False,
    }


class Checkpoints:
    """`workdir/checkpoints`: state.json plus the last and the best weights.

    Args:
      workdir: the run's folder.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.root = os.path.join(workdir, "checkpoints")
        self.state_path = os.path.join(self.root, "state.json")

    def load_state(self) -> dict[str, Any] | None:
        """The saved state, or None when no epoch was checkpointed."""
        if not os.path.isfile(self.state_path):
            return None
        with open(self.state_path, encoding="utf-8") as f:
            return json.load(f)

    def write_state(self, state: dict[str, Any]) -> None:
        """Replaces state.json atomically (without the `_path` a loaded state carries)."""
        fileio.atomic_write_json(self.state_path, {k: v for k, v in state.items() if k != "_path"})

    def save(self, state: dict[str, Any], model: keras.Model, *, best: bool) -> dict[str, Any]:
        """Writes this epoch's weights (and the best ones when `best`), then the state.

        Args:
          state: the run's state; `next_epoch` numbers the checkpoint.
          model: the compiled training model (its optimizer's variables are saved with it).
          best: also keep these weights as the best ones.

        Returns:
          The state, naming the new checkpoints.
        """
        epoch = int(state["next_epoch"])
        state = dict(state, last=self._save_to("last", model, epoch))
        if best:
            state["best_weights"] = self._save_to("best", model, epoch)
        self.write_state(state)
        self._remove_legacy_folders(keep={state.get("best_weights")})
        return state

    def restore(self, name: str, model: keras.Model, *, with_optimizer: bool = True) -> bool:
        """Loads checkpoint `name` into `model`; returns whether optimizer state came with it.

        Args:
          name: a checkpoint state.json names (`last-00003`, `best-00002`).
          model: the training model; compiled and its optimizer built when `with_optimizer`.
          with_optimizer: also restore the optimizer's variables; pass False when the model's
            optimizer belongs to another stage (other trainable weights, other variables).
        """
        optimizer = getattr(model, "optimizer", None)  # absent before compile()
        with_optimizer = with_optimizer and optimizer is not None and optimizer.built
        legacy = os.path.join(self.root, name, _LEGACY_WEIGHTS)
        kind, number = name.rsplit("-", 1)
        path = os.path.join(self.root, kind, f"ckpt-{int(number)}")
        if os.path.isfile(legacy):
            _load_legacy(legacy, model)
        elif with_optimizer:
            status = _checkpoint(model, optimizer).read(path)
            status.assert_existing_objects_matched()
        else:
            _checkpoint(model, None).read(path).expect_partial()
        if not with_optimizer:
            return False
        # convert_to_numpy also reads a tf.distribute MirroredVariable (int() cannot).
        return int(keras.ops.convert_to_numpy(optimizer.iterations)) > 0

    def _save_to(self, kind: str, model: keras.Model, epoch: int) -> str:
        # Two kept: the one state.json names stays until a newer state names the newer one.
        manager = tf.train.CheckpointManager(
            _checkpoint(model, getattr(model, "optimizer", None)),
            os.path.join(self.root, kind),
            max_to_keep=2,
            checkpoint_name="ckpt",
        )
        manager.save(checkpoint_number=epoch)
        return f"{kind}-{epoch:05d}"

    def _remove_legacy_folders(self, keep: set[str | None]) -> None:
        for entry in os.listdir(self.root):
            if entry.startswith(("last-", "best-")) and entry not in keep:
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)


def _checkpoint(model: keras.Model, optimizer: Any) -> tf.train.Checkpoint:
    """The model's weights and the optimizer's variables, tracked by position.

    Not `tf.train.Checkpoint(model=model)`: the model tracks its optimizer, and restoring the
    weights of a stage-1 checkpoint into a stage-2 model would then restore the stage-1
    optimizer's slots into variables of other shapes.
    """
    if optimizer is None or not optimizer.built:
        return tf.train.Checkpoint(weights=list(model.weights))
    return tf.train.Checkpoint(weights=list(model.weights), optimizer=list(optimizer.variables))


def _load_legacy(weights_file: str, model: keras.Model) -> None:
    """A version 1 checkpoint: the Keras weights file of the whole compiled model."""
    with warnings.catch_warnings():
        # Keras skips the optimizer's variables when the model's optimizer has others (another
        # stage, or not compiled yet): what a restore without the optimizer wants.
        warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer")
        model.load_weights(weights_file)


def check_checkpoint_compatible(
    state: dict[str, Any], settings: Settings, class_names: list[str]
) -> None:
    """Refuses to resume a checkpoint made with another backbone, recipe, pooling or classes.

    Raises:
      CheckpointMismatchError: naming each differing field and both values.
    """
    saved = state.get("identity", {})
    wanted = settings.identity()
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, this run {wanted[k]!r}"
        for k in wanted
        if saved.get(k) != wanted[k]
    ]
    if settings.recipe == "head" and state.get("class_names") != list(class_names):
        diffs.append("class_names: the training classes differ")
    if diffs:
        raise CheckpointMismatchError(
            f"{state.get('_path', 'the checkpoint')} was written by a different training run ("
            + "; ".join(diffs)
            + "). Use another --workdir, or the same settings to resume it."
        )


def finished_run_differences(workdir: str, settings: Settings) -> list[str]:
    """The settings in which `settings` differ from the finished run in `workdir` (model.json).

    Returns:
      One 'name (finished run: old, now: new)' per differing setting; [] when they agree or
      the run recorded no settings.
    """
    path = os.path.join(workdir, "model.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("settings") or {}
    # Through JSON, as model.json holds them (tuples become lists).
    now = json.loads(json.dumps(fileio.json_safe(settings.as_dict())))
    return [
        f"{k} (finished run: {saved.get(k)!r}, now: {now.get(k)!r})"
        for k in sorted((set(saved) | set(now)) - _EXECUTION_SETTINGS)
        if saved.get(k) != now.get(k)
    ]


def refuse_other_finished_run(workdir: str, settings: Settings) -> None:
    """Raises when the finished run in `workdir` was made with other settings.

    Raises:
      CheckpointMismatchError: naming each differing setting and what to do.
    """
    diffs = finished_run_differences(workdir, settings)
    if diffs:
        raise CheckpointMismatchError(
            f"{workdir} already holds a finished run made with other settings ("
            + "; ".join(diffs)
            + f"); start a new run with another --workdir=FOLDER, or delete {workdir} "
            "to train there again"
        )

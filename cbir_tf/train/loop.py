"""The training loop: stages, epochs, validation, checkpoints, early stopping, the saved model.

`train(config, ...)` reads the settings from the config, locks the workdir and runs the steps:

1. `_resumable_state`: a checkpoint of another run is refused, a finished run returned as is;
2. `load_training_data`, then the networks in the run's precision and strategy;
3. `_start_state`: the off-the-shelf validation mAP of a new run;
4. `_train_epochs`: per stage `_enter_stage` (trainable blocks, compile, resume), per epoch
   `_train_epoch` (tuples re-mined for the metric recipe, `fit`, validation) and `_score_epoch`
   (best so far, early stopping), then a checkpoint and the logs;
5. `_finish`: the best weights, the whitening, the float32 descriptor model and model.json.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cbir_tf import fileio
from cbir_tf.describe import catalog
from cbir_tf.train import checkpoints as checkpoints_lib
from cbir_tf.train import images as training
from cbir_tf.train import outputs as export
from cbir_tf.train import tuples
from cbir_tf.train.checkpoints import Checkpoints
from cbir_tf.train.data import TrainingData, load_training_data
from cbir_tf.train.epoch_logs import EpochLogs
from cbir_tf.train.network import (
    TrainingModels,
    build_training_models,
    precision_and_strategy,
    prepare_stage,
)
from cbir_tf.train.outputs import TrainResult
from cbir_tf.train.settings import Settings
from cbir_tf.train.validation import describe, validate, validation_kinds

logger = logging.getLogger(__name__)


def train(
    config: Any,
    train_data: str,
    workdir: str,
    val_data: str | None = None,
    *,
    tfds_data_dir: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tunes a descriptor model and writes it to `workdir/model.keras`.

    Resumes from `workdir/checkpoints` when a previous run was interrupted; returns at once when
    the run already finished.

    Args:
      config: the run's config (`model`, `train`, `whitening` sections; see configs/).
      train_data: labelled folder or `tfds:<name>[:<split>]`.
      workdir: output folder (created).
      val_data: validation folder / TFDS spec; None: hold out `train.val_fraction`.
      tfds_data_dir: TFDS data folder.
      progress: print one line per epoch.

    Returns:
      TrainResult.

    Raises:
      settings.TrainConfigError: an unknown, missing or ill-typed `config.train` field.
      folder.CollectionError: unusable training data (see `load_training_data`).
      CheckpointMismatchError: `workdir` holds a checkpoint of another backbone/recipe/pooling,
        or a finished run of other settings (named in the message).
      cbir_tf.fileio.LockError: another training writes to `workdir`.
    """
    settings = Settings.from_config(config)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with fileio.folder_lock(workdir, "this training run"):
        return run_in_workdir(settings, train_data, val_data, workdir, tfds_data_dir, progress)


def run_in_workdir(
    settings: Settings,
    train_data: str,
    val_data: str | None,
    workdir: str,
    tfds_data_dir: str | None,
    progress: bool,
) -> TrainResult:
    """`train` in a workdir this process has locked (arguments as `train`'s)."""
    say = functools.partial(_say, progress)
    checkpoints = Checkpoints(workdir)
    state = _resumable_state(checkpoints, settings, workdir)
    if state is not None and state.get("finished"):
        say(f"{workdir} already holds a finished run: {os.path.join(workdir, export.MODEL_FILE)}")
        return export.result_from_json(workdir)
    data = load_training_data(train_data, val_data, settings, tfds_data_dir)
    class_names = data.train.class_names
    if state is not None:
        checkpoints_lib.check_checkpoint_compatible(state, settings, class_names)
    _announce(settings, data, say)
    with precision_and_strategy(settings) as strategy:
        # Seeded initialisation (the head's dense layers): a run is repeatable.
        keras.utils.set_random_seed(settings.seed)
        with strategy.scope():
            networks = build_training_models(settings, len(class_names))
        if state is None:
            state = _start_state(settings, networks, data, say)
        logs = EpochLogs(os.path.join(workdir, "logs"), say)
        run_start = time.perf_counter()
        state = _train_epochs(settings, networks, data, state, checkpoints, logs, strategy, say)
        run_seconds = time.perf_counter() - run_start
        if state.get("best_weights"):
            checkpoints.restore(state["best_weights"], networks.train, with_optimizer=False)
        white, white_map = None, None
        if settings.recipe == "metric" and settings.whitening != "none":
            white, white_map = export.learn_whitening(settings, networks, data, state, say)
    # Outside the mixed-precision scope: the saved model computes in float32.
    return _finish(settings, networks, data, state, checkpoints, white, white_map, run_seconds, say)


def _say(progress: bool, text: str) -> None:
    logger.debug(text)
    if progress:
        print(text, flush=True)


def _resumable_state(
    checkpoints: Checkpoints, settings: Settings, workdir: str
) -> dict[str, Any] | None:
    """The workdir's saved state, after refusing one of another run (before loading images)."""
    state = checkpoints.load_state()
    if state is None:
        return None
    state["_path"] = checkpoints.state_path
    checkpoints_lib.check_checkpoint_compatible(state, settings, state.get("class_names", []))
    if state.get("finished") and os.path.isfile(os.path.join(workdir, export.MODEL_FILE)):
        checkpoints_lib.refuse_other_finished_run(workdir, settings)
        return state
    return dict(state, finished=False)


def _announce(settings: Settings, data: TrainingData, say) -> None:
    skipped = data.skipped
    say(
        f"training {settings.recipe} recipe: "
        f"{catalog.display_name(settings.backbone, settings.alpha)} {settings.pooling}, "
        f"{len(data.train)} images in {len(data.train.class_names)} classes"
        + (f", validation {len(data.val)} images" if data.val is not None else ", no validation")
        + (f"; {len(skipped)} unreadable images skipped" if skipped else "")
    )


def _start_state(
    settings: Settings, networks: TrainingModels, data: TrainingData, say
) -> dict[str, Any]:
    """The state of a new run, with the untrained descriptor's validation mAP."""
    base = validate(settings, networks, data, ("pooled",))
    if base:
        say(f"off-the-shelf validation mAP {base['pooled']:.4f}")
    return checkpoints_lib.new_state(settings, data.train.class_names, base.get("pooled"))


def _train_epochs(
    settings: Settings,
    networks: TrainingModels,
    data: TrainingData,
    state: dict[str, Any],
    checkpoints: Checkpoints,
    logs: EpochLogs,
    strategy: tf.distribute.Strategy,
    say,
) -> dict[str, Any]:
    """Trains from `state['next_epoch']` to the end, checkpointing every epoch.

    Returns:
      The state after the last epoch.
    """
    kinds = validation_kinds(settings)
    stage, learning_rate = None, 0.0
    epoch = int(state["next_epoch"])
    while epoch < settings.total_epochs:
        if settings.stage_of(epoch) != stage:
            learning_rate = _enter_stage(
                settings, networks, state, checkpoints, strategy, stage, epoch, say
            )
            stage = settings.stage_of(epoch)
        record = _train_epoch(settings, networks, data, epoch, (stage, learning_rate), kinds, say)
        improved, stop = _score_epoch(settings, state, record, data.val is not None)
        state = checkpoints.save(state, networks.train, best=improved)
        logs.write(record, state["history"])
        say(_epoch_line(settings, record, improved))
        if stop:
            say(f"  early stopping: no improvement for {settings.early_stopping_patience} epochs")
        epoch = int(state["next_epoch"])
    return state


def _enter_stage(
    settings: Settings,
    networks: TrainingModels,
    state: dict[str, Any],
    checkpoints: Checkpoints,
    strategy: tf.distribute.Strategy,
    previous_stage: int | None,
    epoch: int,
    say,
) -> float:
    """Starts the stage of `epoch`: its weights, trainable blocks and optimizer; resumes it.

    Returns:
      The stage's learning rate.
    """
    stage = settings.stage_of(epoch)
    if previous_stage is not None or stage == 2:
        # A new stage starts from the best weights of the previous one.
        name = state.get("best_weights") or state.get("last")
        if name:
            checkpoints.restore(name, networks.train, with_optimizer=False)
    with strategy.scope():
        learning_rate = prepare_stage(settings, networks, stage)
    if state.get("last") and state.get("stage") == stage:
        restored = checkpoints.restore(state["last"], networks.train)
        say(
            f"resumed from {state['last']} (epoch {epoch}"
            + (", optimizer state restored)" if restored else ")")
        )
    elif state.get("stage") != stage:
        state["epochs_without_improvement"] = 0
    state["stage"] = stage
    trainable = len(networks.backbone.trainable_weights)
    say(
        f"stage {stage}: learning rate {learning_rate:g}, "
        f"{trainable} trainable backbone weight tensors"
    )
    return learning_rate


def _train_epoch(
    settings: Settings,
    networks: TrainingModels,
    data: TrainingData,
    epoch: int,
    stage: tuple[int, float],
    kinds: tuple[str, ...],
    say,
) -> dict[str, Any]:
    """One epoch of `fit` and the validation after it.

    Args:
      stage: the stage and its learning rate (recorded).

    Returns:
      The epoch's record: epoch, stage, seconds, fit's figures (loss, accuracy),
      val_map_<kind>, GeM's p for the metric recipe, learning rate.
    """
    start = time.perf_counter()
    dataset = epoch_dataset(settings, networks, data, epoch, say)
    history = networks.train.fit(
        dataset, epochs=epoch + 1, initial_epoch=epoch, verbose=0, shuffle=False
    )
    fit_logs = {k: float(v[-1]) for k, v in history.history.items()}
    val = validate(settings, networks, data, kinds)
    record = {"epoch": epoch, "stage": stage[0], "seconds": time.perf_counter() - start}
    record.update(fit_logs)
    record.update({f"val_map_{k}": v for k, v in val.items()})
    if settings.recipe == "metric":
        record["gem_p"] = export.trained_gem_p(networks)
    record["learning_rate"] = stage[1]
    return record


def _score_epoch(
    settings: Settings, state: dict[str, Any], record: dict[str, Any], validated: bool
) -> tuple[bool, bool]:
    """Adds the epoch to the state: best so far, patience, the next epoch.

    The best epoch has the highest validation mAP over the descriptor kinds validated (without
    validation: the lowest loss). Early stopping ends the stage: the head recipe still runs its
    second stage.

    Returns:
      (improved, early stop).
    """
    val = {k[len("val_map_") :]: v for k, v in record.items() if k.startswith("val_map_")}
    score_kind = max(val, key=val.get) if val else None
    score = val[score_kind] if val else -float(record.get("loss", 0.0))
    improved = state["best_map"] is None or score > state["best_map"] + 1e-7
    if improved:
        state.update(best_map=score, best_epoch=record["epoch"], best_kind=score_kind)
        state["epochs_without_improvement"] = 0
    else:
        state["epochs_without_improvement"] += 1
    state["history"].append(record)
    state["train_seconds"] = float(state["train_seconds"]) + record["seconds"]
    patience = settings.early_stopping_patience
    stop = validated and patience > 0 and state["epochs_without_improvement"] >= patience
    next_epoch = record["epoch"] + 1
    if stop:
        second_stage = record["stage"] == 1 and settings.total_epochs > settings.epochs
        next_epoch = settings.epochs if second_stage else settings.total_epochs
    state["next_epoch"] = next_epoch
    return improved, stop


def _epoch_line(settings: Settings, record: dict[str, Any], improved: bool) -> str:
    val = " ".join(
        f"val mAP {k[len('val_map_') :]} {v:.4f}"
        for k, v in record.items()
        if k.startswith("val_map_")
    )
    loss = record.get("loss", float("nan"))
    return (
        f"epoch {record['epoch'] + 1}/{settings.total_epochs} (stage {record['stage']}) "
        f"loss {loss:.4f}"
        + (f" acc {record['accuracy']:.3f}" if "accuracy" in record else "")
        + (f" {val}" if val else "")
        + (" *best*" if improved else "")
        + f" [{record['seconds']:.1f}s]"
    )


def epoch_dataset(
    settings: Settings, networks: TrainingModels, data: TrainingData, epoch: int, say
) -> tf.data.Dataset:
    """The batches of one epoch: augmented labelled images, or freshly mined tuples (metric).

    Args:
      settings: recipe, sizes, augmentation, seed; the metric recipe's mining parameters.
      networks: the current networks (the metric recipe mines with the current descriptor).
      data: the training images.
      epoch: 0-based; seeds the epoch's shuffling, augmentation and mining.
      say: prints a progress line.
    """
    seed = settings.seed * 100003 + epoch
    if settings.recipe == "head":
        return training.classification_dataset(
            data.train,
            settings.image_size,
            settings.batch_size,
            settings.augment,
            seed=seed,
            shuffle=True,
        )
    embed = networks.embed(networks.descriptor)

    def describe_indices(indices):
        return describe(
            networks.descriptor,
            data.train,
            indices,
            settings.image_size,
            settings.batch_size,
            embed,
        )

    start = time.perf_counter()
    epoch_tuples = tuples.create_epoch_tuples(
        data.train.labels,
        describe_indices,
        settings.tuples_per_epoch,
        settings.pool_size,
        settings.num_negatives,
        np.random.default_rng(seed),
    )
    say(
        f"  mined {len(epoch_tuples)} tuples in {time.perf_counter() - start:.1f}s "
        f"(mean negative distance {epoch_tuples.mean_negative_distance:.3f})"
    )
    # Tuples are several images each: keep the number of images per step near batch_size.
    tuples_per_batch = max(1, settings.batch_size // (2 + settings.num_negatives))
    return training.tuple_dataset(
        data.train,
        epoch_tuples.as_array(),
        settings.image_size,
        tuples_per_batch,
        settings.augment,
        seed=seed,
    )


def _finish(
    settings: Settings,
    networks: TrainingModels,
    data: TrainingData,
    state: dict[str, Any],
    checkpoints: Checkpoints,
    white,
    white_map: float | None,
    run_seconds: float,
    say,
) -> TrainResult:
    """Saves the descriptor model, the whitening and model.json; marks the run finished."""
    kind = export.final_descriptor_kind(settings, state)
    final = export.final_model(settings, networks, kind, white)
    descriptor = "whitened" if white is not None else kind
    model_path = export.save_model(
        final, checkpoints.workdir, export.model_info(settings, descriptor)
    )
    if white is not None:
        white.save(os.path.join(checkpoints.workdir, "whitening.npz"))
    state.update(finished=True, final_descriptor=descriptor)
    checkpoints.write_state(state)
    val_best = state["best_map"] if data.val is not None else None
    result = TrainResult(
        model_path=model_path,
        descriptor=descriptor,
        best_val_map=export.as_float(white_map if white_map is not None else val_best),
        off_the_shelf_val_map=export.as_float(state["off_the_shelf_val_map"]),
        best_epoch=int(state["best_epoch"] if state["best_epoch"] is not None else -1),
        history=state["history"],
        train_seconds=run_seconds,
        skipped=data.skipped,
    )
    export.write_model_json(
        checkpoints.workdir, settings, result, data.train.class_names, white, data
    )
    say(f"saved {model_path} ({descriptor} descriptor, val mAP {result.best_val_map:.4f})")
    return result

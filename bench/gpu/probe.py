"""Epochs that fit a training-time budget, from timed first epochs of a probe (bench/gpu/run.sh).

`cifarflow train --time-budget` has not landed, so run.sh picks each budgeted run's epoch
count before the run: this probe builds the recipe's model with the trainer's own functions
(cifarflow.training.trainer: load_splits, build_and_compile, input_pipelines; the plan's
phases prepared and compiled as the trainer does), fits every phase of the plan for 2
epochs on a stratified sample of ``--images`` training images with the run's callbacks
(checkpoints included; no MLflow, no scoring), and times each epoch. Epoch 0 of a phase = its XLA compilation + one epoch; epoch 1 = a
steady epoch. A steady epoch of the real run is projected linearly from the sample's
images to the run's (validation included, in the same proportion), and

    epochs = floor((budget - sum of the phases' compile seconds - fixed epochs' seconds) / epoch seconds)

(at least 1), where the fixed epochs are those of the phases run.sh does not size (the
head epoch of a two-phase transfer recipe). The run's own ``train_seconds`` (compilation
included) then lands near the budget; run.sh reports it, so any miss is visible.

A recipe in mixed precision whose compiled predictions are not finite (seen: JAX 0.11.2 on CPU, WRN in
mixed_bfloat16) is timed in float32 instead, with ``precision_fallback`` saying why.

Prints one JSON object: {"epochs", "epoch_seconds", "compile_seconds", "precision", "phases": [...], ...}.

    python bench/gpu/probe.py RECIPE --budget SECONDS [--images N] [--sized-phase NAME] [--set k=v ...]
    python bench/gpu/probe.py epochs-for PROBE.json --budget SECONDS   # the same formula, another budget
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path


def _backend() -> str:
    import keras

    if keras.backend.backend() != "jax":
        return keras.backend.backend()
    import jax

    return f"JAX {jax.__version__} ({jax.devices()[0].platform})"


def epochs_for(probe: dict, budget: float) -> int:
    """Epochs of the sized phase that fit ``budget`` training seconds, from a probe's JSON (at least 1)."""
    spare = budget - probe["compile_seconds"] - probe["fixed_seconds"]
    return max(1, math.floor(spare / max(probe["epoch_seconds"], 1e-9)))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["epochs-for"]:  # run.sh: the epochs for a budget known only after the probe
        q = argparse.ArgumentParser(prog="probe.py epochs-for")
        q.add_argument("json", help="the probe's JSON output (a file)")
        q.add_argument("--budget", type=float, required=True)
        a = q.parse_args(argv[1:])
        epochs = epochs_for(json.loads(open(a.json).read().strip().splitlines()[-1]), a.budget)
        print(epochs)
        return {"epochs": epochs}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--budget", type=float, required=True, help="training seconds of the real run")
    p.add_argument("--images", type=int, default=5120, help="training images of the probe (before the split)")
    p.add_argument("--data", default=None)
    p.add_argument("--limit", type=int, default=None, help="the real run's --limit (default: all images)")
    p.add_argument("--epochs", type=int, default=None, help="the real run's --epochs, if given")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sized-phase", default=None,
                   help="the phase whose epochs are sized (default: the last); the others keep theirs")
    args = p.parse_args(argv)

    import keras  # after the arguments: KERAS_BACKEND is read at import
    import numpy as np

    from cifarflow import config as cfg
    from cifarflow import tracking
    from cifarflow.data import datasets
    from cifarflow.training import plans, trainer

    overrides = {**cfg.parse_overrides(args.sets),
                 **{k: v for k, v in (("data", args.data), ("limit", args.limit), ("epochs", args.epochs))
                    if v is not None}}
    real = cfg.resolve(args.recipe, overrides)
    probe = real.model_copy(update={"limit": min(args.images, real.limit or args.images)})

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)

    def finite(model, x) -> bool:
        """Whether the compiled predict gives finite probabilities (cifarflow scores with it)."""
        return bool(np.isfinite(model.predict(x, batch_size=probe.batch_size, verbose=0)).all())

    started = time.perf_counter()
    fallback = ""
    trainer.seed_everything(probe.seed)
    splits = trainer.load_splits(probe)
    x_all, y_all = datasets.limit_per_class(splits.ds.x_train, splits.ds.y_train, real.limit, real.seed)
    real_train = len(datasets.train_val_split(x_all, y_all, real.val_fraction, real.seed)[1])
    check = splits.x_train[:probe.batch_size]
    # JAX 0.11.2's XLA:CPU returned NaN from a jitted WRN in mixed_bfloat16 (at its global average pooling;
    # eager calls and JAX 0.10.2 are fine): rather than lose a whole budgeted run to it at scoring time,
    # time float32 instead and say so (run.sh then trains in the probe's "precision")
    with trainer.dtype_policy(probe.precision):
        model = trainer.build_and_compile(probe, splits.ds.num_classes, splits.x_train)
        if probe.precision != "float32" and not finite(model, check):
            fallback = f"{probe.precision} predictions are not finite on {_backend()}: float32 instead"
            probe = probe.model_copy(update={"precision": "float32"})
    with trainer.dtype_policy(probe.precision), tempfile.TemporaryDirectory() as scratch:
        if fallback:
            model = trainer.build_and_compile(probe, splits.ds.num_classes, splits.x_train)
        train_ds, val_ds, data_callbacks = trainer.input_pipelines(probe, splits)
        plan = plans.plan(probe)
        plan.before_fit(model, train_ds)
        steps = math.ceil(len(splits.y_train) / probe.batch_size)
        sized = args.sized_phase or plan.phases[-1].name
        phases = []
        for index, phase in enumerate(plan.phases, start=1):
            phase.prepare(model)
            trainer.compile_model(model, phase.config, steps)
            clock = Clock()
            # the run's own callbacks (early stopping, best-epoch and resume checkpoints: their per-epoch
            # writes are part of an epoch; the clock last, to time them), its MLflow logging left out
            run_callbacks = trainer.make_callbacks(probe, train_images=len(splits.y_train),
                                                   checkpoint_dir=Path(scratch) / str(index),
                                                   has_validation=val_ds is not None, restore=False,
                                                   phase={"phase": index, "phase_start": 0, "spans": []})
            for c in run_callbacks:
                if isinstance(c, tracking.EpochLogger):
                    c.on_epoch_end = lambda epoch, logs=None: None
            model.fit(train_ds, validation_data=val_ds, epochs=2, callbacks=[*run_callbacks, *data_callbacks, clock],
                      shuffle=False, verbose=0)
            first, steady = clock.seconds
            phases.append({"phase": phase.name, "recipe_epochs": phase.epochs, "first_epoch_s": round(first, 3),
                           "steady_epoch_s": round(steady, 3), "compile_s": round(max(0.0, first - steady), 3),
                           "projected_epoch_s": round(steady * real_train / len(splits.y_train), 3)})
        finite_after_fit = finite(model, check)
    scaled = next((ph for ph in phases if ph["phase"] == sized), None)
    if scaled is None:
        raise SystemExit(f"no phase {sized!r} in the plan ({', '.join(ph['phase'] for ph in phases)})")
    out = {"recipe": args.recipe, "budget_s": args.budget, "sized_phase": sized,
           "epoch_seconds": scaled["projected_epoch_s"],
           "compile_seconds": round(sum(ph["compile_s"] for ph in phases), 3),
           "fixed_seconds": round(sum(ph["recipe_epochs"] * ph["projected_epoch_s"]
                                      for ph in phases if ph is not scaled), 3),
           "probe_train_images": len(splits.y_train),
           "real_train_images": real_train, "probe_wall_s": round(time.perf_counter() - started, 1),
           "backend": keras.backend.backend(), "precision": probe.precision, "precision_fallback": fallback,
           "finite_after_fit": finite_after_fit, "phases": phases}
    out["epochs"] = epochs_for(out, args.budget)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""Command line: `cifarflow train`, `tune`, `evaluate`, `compare`, `ensemble`, `data info`, `register`, `promote`, `export`, `pull`, `predict`, with one-line errors for fixable problems."""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported: no C++ log noise
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # model loads are not downloads to watch

import click  # noqa: E402

from cifarflow.errors import CifarflowError  # noqa: E402
from cifarflow.evaluation.metrics import TTA_MODES  # noqa: E402
from cifarflow.serving import import_tensorflow_quietly, require_backend  # noqa: E402


def _recipe_descriptions() -> dict[str, str]:
    """``{recipe name: its description}`` of the recipe files, read without importing the models."""
    import yaml

    from cifarflow.utils import available_recipes, recipes_dir

    out = {}
    for name in available_recipes():
        try:
            out[name] = str((yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text()) or {}).get("description", ""))
        except (OSError, yaml.YAMLError):
            out[name] = ""
    return out


def _complete_recipes(ctx, param, incomplete: str):
    """Shell completion of RECIPE: the recipe names starting with what was typed (a path completes as a file)."""
    from click.shell_completion import CompletionItem

    if "/" in incomplete or incomplete.endswith((".yaml", ".yml")):
        return [CompletionItem(incomplete, type="file")]
    return [CompletionItem(name, help=about) for name, about in _recipe_descriptions().items()
            if name.startswith(incomplete)]


class _Command(click.Command):
    """A command that imports TensorFlow (quietly) once its arguments are parsed and checked, just before
    its body runs: a refused argument (e.g. an ``--out`` below a file, :func:`output_option`) answers in
    well under a second, not after TensorFlow's 6 s import. A no-op on the other Keras backends."""

    def invoke(self, ctx: click.Context):
        import_tensorflow_quietly()
        return super().invoke(ctx)


class _RecipeCommand(_Command):
    """A command taking RECIPE: its --help lists the recipes (name and description) before the examples."""

    def format_epilog(self, ctx, formatter) -> None:
        recipes = _recipe_descriptions()
        if recipes:
            with formatter.section("Recipes (experiments/*.yaml)"):
                formatter.write_dl(sorted(recipes.items()))
        super().format_epilog(ctx, formatter)


class _Echo(logging.Handler):
    """Prints a log record's message on the current stdout (beside Keras' epoch lines; stderr keeps errors)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record))


def _show_progress(logger: str = "cifarflow") -> None:
    """Print the INFO lines of ``logger`` (what a long step is doing), bare, once."""
    log = logging.getLogger(logger)
    if not any(isinstance(h, _Echo) for h in log.handlers):
        log.addHandler(_Echo())
    log.setLevel(logging.INFO)
    log.propagate = False


def _overrides(sets, **options) -> dict:
    """``--set key=value`` items plus the options the user gave (None = not given)."""
    from cifarflow import config as cfg

    return {**cfg.parse_overrides(sets), **{k: v for k, v in options.items() if v is not None}}


def output_option(*, folder: bool = True):
    """A click option callback running :func:`check_output` on the value (when given) while the command
    line is parsed, so a bad output is refused before any import or work; errors name the option."""

    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is not None:
            check_output(value, param.opts[0], folder=folder)
        return value

    return callback


def check_output(path, option: str, *, folder: bool = True) -> None:
    """Refuse an output that cannot be written, before any work is done (nothing is created).

    Args:
        path: the output as given.
        option: its option name, e.g. ``--out``, for the message.
        folder: ``path`` is a folder (made later where missing, so its nearest
            existing ancestor must be a writable folder); else a file, whose
            folder must exist and be writable.

    Raises:
        CifarflowError: a file where a folder is needed (or the reverse), a
            missing folder for a file, or a folder this user cannot write in.
    """
    import tempfile
    from pathlib import Path

    target = Path(path).absolute()
    if not folder and target.is_dir():
        raise CifarflowError(f"{option} {path} is a folder, not a file", f"pass a file path with {option}")
    where = target if folder else target.parent
    existing = next(p for p in (where, *where.parents) if p.exists())
    if not existing.is_dir():
        raise CifarflowError(f"{option} {path} lies below {existing}, which is a file, not a folder",
                             f"pass another {option}")
    if not folder and existing != where:
        raise CifarflowError(f"folder of {option} {path} does not exist", f"create it or pass another {option}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise CifarflowError(f"cannot write {option} {path}: {existing} is not writable ({exc.strerror})",
                             f"pass a folder you can write to with {option}, or fix its permissions") from None


class _Group(click.Group):
    """The command group; notes whether the command line asks for help (no TensorFlow needed then)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["cifarflow.help"] = any(a in ("-h", "--help") for a in args)
        return super().parse_args(ctx, args)


WITHOUT_TENSORFLOW = ("data",)  # commands that never import TensorFlow


COMPLETION = """Shell completion of commands, options and recipe names (add to ~/.bashrc or ~/.zshrc):

\b
  eval "$(_CIFARFLOW_COMPLETE=bash_source cifarflow)"     bash
  eval "$(_CIFARFLOW_COMPLETE=zsh_source cifarflow)"      zsh
  _CIFARFLOW_COMPLETE=fish_source cifarflow | source     fish
"""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=COMPLETION)
@click.version_option(package_name="cifarflow")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """cifarflow: MLflow-tracked CIFAR-10 experiments."""
    if ctx.invoked_subcommand not in WITHOUT_TENSORFLOW and not ctx.meta["cifarflow.help"]:
        require_backend()  # TensorFlow itself: _Command, once the command's arguments are checked


cli.command_class = _Command  # every command but `data`'s (a plain click group: no TensorFlow)


TRAIN_EXAMPLES = """Examples:

\b
  cifarflow train cnn_small --limit 5000 --epochs 3     smoke run: a few minutes on real data
  cifarflow train cnn_small                             the full recipe (about 30 min on 2 CPU cores)
  cifarflow train resnet20 --set learning_rate=0.05 --set tta=flip
  cifarflow train my_recipe.yaml --data ~/data/cifar10-jpeg.tar.gz
  cifarflow train wrn --resume RUN_ID                   continue an interrupted run
"""


@cli.command(cls=_RecipeCommand, epilog=TRAIN_EXAMPLES)
@click.argument("recipe", shell_complete=_complete_recipes)
@click.option("--data", default=None, help="cifar10 (default; $CIFARFLOW_DATA, Keras cache, download), a folder or an archive.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only N training images (stratified sample) for smoke runs.")
@click.option("--seed", type=int, default=None, help="Random seed (default 42).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe or model parameter; repeatable.")
@click.option("--skip-corrupt", is_flag=True, default=None, help="Drop unreadable images (count logged) instead of failing.")
@click.option("--resize", is_flag=True, default=None, help="Resize images that are not 32x32 instead of failing.")
@click.option("--trust-data", is_flag=True, default=None, help="Unpickle a pickle-layout source without restrictions (it can run code: only data you trust).")
@click.option("--resume", default=None, metavar="RUN_ID", help="Continue an interrupted run from its last finished epoch.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(recipe, data, epochs, limit, seed, sets, skip_corrupt, resize, trust_data, resume, quiet) -> None:
    """Train RECIPE (a name in experiments/ or a .yaml path) and log it to MLflow."""
    if not quiet:
        _show_progress()
    from cifarflow import config as cfg
    from cifarflow import tracking
    from cifarflow.training.trainer import train as run_training

    overrides = _overrides(sets, data=data, epochs=epochs, limit=limit, seed=seed,
                           skip_corrupt=skip_corrupt, resize=resize, trust_data=trust_data)
    config = cfg.resolve(recipe, overrides)
    result = run_training(config, quiet=quiet, run_name=tracking.run_name(config, recipe), resume=resume)
    from cifarflow.training import distribute

    index, count = distribute.processes()
    if index:  # a run over several processes: process 0 recorded it
        click.echo(f"process {index} of {count}: done (process 0 records the run)")
        return
    m = result.metrics
    click.echo(f"run {result.run_id}: test_accuracy={m['test_accuracy']:.4f} test_loss={m['test_loss']:.4f} "
               f"train_seconds={m['train_seconds']:.0f} model={result.model_uri}")


TUNE_EXAMPLES = """Examples:

\b
  cifarflow tune cnn_small --study smoke --trials 3 --epochs 2 --limit 2000
  cifarflow tune cnn_small --study cnn-search --trials 20 --storage postgresql://user:pw@db/optuna
"""


@cli.command(cls=_RecipeCommand, epilog=TUNE_EXAMPLES)
@click.argument("recipe", shell_complete=_complete_recipes)
@click.option("--study", "study_name", required=True, help="Study name; the same name resumes or joins it.")
@click.option("--trials", type=click.IntRange(min=1), required=True, help="Complete + pruned trials the study should hold.")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True, help="Optuna storage (SQLAlchemy URL).")
@click.option("--space", "space_path", default=None, help="Search file (default: the one in experiments/search/ listing RECIPE).")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after S seconds.")
@click.option("--n-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads running trials in this process (their MLflow runs are serialised: for parallel "
                   "trials start several workers on the same --storage).")
@click.option("--heartbeat", type=click.IntRange(min=1), default=60, show_default=True,
              help="Seconds between trial heartbeats; a trial silent for twice that is marked FAIL.")
@click.option("--metric", type=click.Choice(["val_accuracy", "val_loss"]), default=None,
              help="Objective (default: the search file's); maximized for accuracy, minimized for loss.")
@click.option("--retrain-best", is_flag=True, help="Then train the best params on all of train+val (no --limit) with the full epochs.")
@click.option("--data", default=None, help="Data source, as for train.")
@click.option("--trust-data", is_flag=True, default=None, help="Unpickle a pickle-layout source without restrictions (it can run code: only data you trust).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per trial.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Training images per trial.")
@click.option("--seed", type=int, default=None)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Fixed overrides for every trial.")
@click.option("--quiet/--progress", default=True, show_default=True, help="Progress bars of each trial.")
def tune(recipe, study_name, trials, storage, space_path, timeout, n_jobs, heartbeat, metric, retrain_best,
         data, trust_data, epochs, limit, seed, sets, quiet) -> None:
    """Search RECIPE's settings with Optuna; every trial is a nested MLflow run (one line each when it ends)."""
    _show_progress("cifarflow.data")  # a first extraction is worth a word; each trial's steps are not
    from cifarflow.training import tuning

    overrides = _overrides(sets, data=data, epochs=epochs, limit=limit, seed=seed, trust_data=trust_data)
    study = tuning.tune(recipe, study_name, trials, overrides=overrides, storage=storage, space_path=space_path,
                        timeout=timeout, n_jobs=n_jobs, quiet=quiet, heartbeat=heartbeat, metric=metric,
                        retrain_best=retrain_best, report=click.echo)
    states = [t.state.name for t in study.trials]
    click.echo(f"study {study_name}: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
               f"{states.count('FAIL')} failed")
    if states.count("COMPLETE"):
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in study.best_params.items())
        click.echo(f"best {study.best_value:.4f} (trial {study.best_trial.number}): {shown}")


@cli.command("evaluate")
@click.argument("model_ref", metavar="MODEL")
@click.option("--data", default=None, help="The model's data at another path (checked by sha256).")
@click.option("--tta", type=click.Choice(list(TTA_MODES)), default="none", show_default=True,
              help="Also score the average of each image and its mirror.")
@click.option("--fgsm-images", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Size of the fixed test subset for FGSM robustness.")
def evaluate_command(model_ref, data, tta, fgsm_images) -> None:
    """Score MODEL (models:/..., runs:/RUN_ID or a run id) on its test set; log a linked run."""
    from cifarflow.evaluation import evaluator, scoring

    run_id, metrics = evaluator.evaluate(model_ref, data=data, tta=tta, fgsm_images=fgsm_images)
    click.echo(scoring.format_table(metrics), nl=False)
    click.echo(f"evaluation run {run_id}")


@cli.command("compare")
@click.option("--experiments", "-e", multiple=True, help="Experiments to compare (default: every cifarflow/ one).")
@click.option("--metric", default="test_accuracy", show_default=True, help="Ranking metric, best first.")
@click.option("--out", type=click.Path(file_okay=False), default="comparison", show_default=True,
              callback=output_option(), help="Folder for comparison.md/.csv and the plots.")
@click.option("--latency", is_flag=True, help="Also time batch-1 predictions of each model.")
def compare_command(experiments, metric, out, latency) -> None:
    """Table and plots of finished runs side by side, logged as a comparison run."""
    from pathlib import Path

    from cifarflow.evaluation import compare

    run_id, rows = compare.compare(list(experiments) or None, metric, Path(out), latency)
    click.echo(compare.to_markdown(rows), nl=False)
    click.echo(f"comparison run {run_id}; files in {out}/")


@cli.command("ensemble")
@click.argument("model_refs", nargs=-1, required=True, metavar="MODEL_URI...")
@click.option("--method", type=click.Choice(["soft", "hard"]), default="soft", show_default=True,
              help="soft: average the probabilities; hard: majority vote of the top classes.")
@click.option("--weights", multiple=True, metavar="W[,W...]", help="One weight per model (default equal): --weights 2,1.")
@click.option("--data", default=None, help="The models' data at another path (checked by sha256).")
@click.option("--tta", type=click.Choice(list(TTA_MODES)), default="none", show_default=True,
              help="Also score the average of each image and its mirror.")
@click.option("--fgsm-images", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Size of the fixed test subset for FGSM robustness.")
def ensemble_command(model_refs, method, weights, data, tta, fgsm_images) -> None:
    """Vote MODEL_URI... (models:/..., runs:/RUN_ID or run ids); score and log the ensemble as a pyfunc model."""
    from cifarflow.evaluation import ensemble, scoring

    result = ensemble.ensemble(list(model_refs), method, ensemble.parse_weights(weights, len(model_refs)),
                               data=data, tta=tta, fgsm_images=fgsm_images)
    click.echo(scoring.format_table(result.metrics), nl=False)
    for name, acc in result.member_accuracy.items():
        click.echo(f"member {name}: test_accuracy={acc:.4f}")
    click.echo(f"ensemble {method}: test_accuracy={result.metrics['test_accuracy']:.4f}; "
               f"run {result.run_id}, model {result.model_uri}")


@cli.group()
def data() -> None:
    """Inspect data sources."""


@data.command("info")
@click.argument("source", default="cifar10")
@click.option("--out", type=click.Path(dir_okay=False), default=None, callback=output_option(folder=False),
              help="Also write a PNG grid of sample images per class to this file.")
@click.option("--skip-corrupt", is_flag=True, help="Drop unreadable images instead of failing.")
@click.option("--resize", is_flag=True, help="Resize images that are not 32x32.")
@click.option("--trust-data", is_flag=True, help="Unpickle a pickle-layout source without restrictions (it can run code: only data you trust).")
def data_info(source, out, skip_corrupt, resize, trust_data) -> None:
    """Counts per class and checksum of SOURCE (and a sample grid with --out)."""
    from pathlib import Path

    from cifarflow.data import datasets as d
    from cifarflow import plots

    ds = d.load(source, skip_corrupt=skip_corrupt, resize=resize, trust_data=trust_data)
    if not len(ds.y_train):
        raise CifarflowError(f"no readable training image in {source}", "check the data")
    train_counts = d.class_counts(ds.y_train, ds.class_names)
    test_counts = d.class_counts(ds.y_test, ds.class_names)
    click.echo(f"source:   {ds.source}")
    click.echo(f"sha256:   {ds.checksum}")
    click.echo(f"images:   {len(ds.y_train)} train, {len(ds.y_test)} test, {ds.num_classes} classes, "
               f"{ds.x_train.shape[1]}x{ds.x_train.shape[2]}x{ds.x_train.shape[3]} {ds.x_train.dtype}")
    if ds.skipped_files:
        click.echo(f"skipped:  {len(ds.skipped_files)} corrupt images")
    width = max(len(c) for c in ds.class_names)
    click.echo(f"{'class':<{width}}  {'train':>6}  {'test':>6}")
    for name in ds.class_names:
        click.echo(f"{name:<{width}}  {train_counts[name]:>6}  {test_counts[name]:>6}")
    if out:
        plots.samples_per_class(ds.x_train, ds.y_train, ds.class_names, Path(out),
                                title=f"{Path(ds.source).name or source}: random training images per class")
        click.echo(f"samples:  {out}")



@cli.command()
@click.argument("source", required=False, default="")
@click.option("--best-of", default="", metavar="EXPERIMENT", help="Register the best finished run of EXPERIMENT instead.")
@click.option("--metric", default="test_accuracy", show_default=True, help="Final metric ranking --best-of runs.")
@click.option("--name", default="", help="Registered model name (default: the policy's name for the architecture).")
@click.option("--promote", "then_promote", is_flag=True, help="Then run `cifarflow promote` on the model.")
def register(source, best_of, metric, name, then_promote) -> None:
    """Register SOURCE (models:/<model_id> or a run id) as the new challenger version."""
    from cifarflow.deploy import registry
    from cifarflow.tracking import refs

    src = refs.resolve_source(source or None, best_of=best_of or None, metric=metric)
    ref = registry.register(src, name or None)
    click.echo(f"registered {ref.name} version {ref.version} (alias {refs.CHALLENGER}) "
               f"from run {src.run_id}, {src.model_uri}")
    if then_promote:
        _echo_decision(registry.promote(ref.name))


def _echo_decision(d) -> None:
    outcome = f"champion -> v{d.challenger}" if d.promoted else f"champion stays v{d.champion_before}"
    click.echo(f"{d.name}: {outcome} ({d.reason})")


@cli.command()
@click.argument("model")
@click.option("--force", is_flag=True, help="Move champion even if the policy says no (recorded as forced).")
def promote(model, force) -> None:
    """Move MODEL's champion alias to its challenger if it beats the champion by the policy's margin."""
    from cifarflow.deploy import registry

    _echo_decision(registry.promote(model, force=force))


@cli.command("export")
@click.argument("model_uri")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite", "all"]), default="all", show_default=True)
@click.option("--quantize", multiple=True, default=("none",), show_default=True,
              help="TFLite mode(s): none (float32), float16, dynamic, int8, all; repeatable or comma-separated.")
@click.option("--out", type=click.Path(file_okay=False), default=None, callback=output_option(),
              help="Output folder (default export/<model>/<version>/).")
@click.option("--data", default=None, help="Test data (default: the training run's data source).")
def export_command(model_uri, fmt, quantize, out, data) -> None:
    """Export MODEL_URI (models:/NAME/VERSION, NAME@ALIAS) to ONNX/TFLite, verified against Keras."""
    from pathlib import Path

    from cifarflow.deploy import export as ex

    modes = [m.strip() for q in quantize for m in q.split(",") if m.strip()]
    modes = list(ex.QUANTIZE) if "all" in modes else modes
    formats = list(ex.FORMATS) if fmt == "all" else [fmt]
    results, run_id = ex.export(model_uri, formats, modes, out_dir=Path(out) if out else None, data=data)
    for r in results:
        click.echo(f"{r.kind:<15} {r.size_bytes / 1024:8.1f} KiB  max_abs_diff={r.max_abs_diff:.2e}  "
                   f"top1_agreement={r.top1_agreement:.4f}  test_accuracy={r.test_accuracy:.4f} "
                   f"(keras {r.keras_test_accuracy:.4f})  {r.path}")
    click.echo(f"logged to run {run_id}")


@cli.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["keras", "mlflow", "onnx", "tflite"]), default="keras",
              show_default=True, help="keras: model.keras; mlflow: the MLflow model folder (any flavor, e.g. an ensemble).")
@click.option("--quantize", type=click.Choice(["none", "float16", "dynamic", "int8"]), default="none",
              show_default=True, help="Which TFLite file.")
@click.option("--dest", type=click.Path(file_okay=False), required=True, callback=output_option(),
              help="Output folder.")
def pull(model, fmt, quantize, dest) -> None:
    """Download MODEL (NAME@ALIAS, NAME/VERSION) for deployment, with a model_card.json."""
    from pathlib import Path

    from cifarflow.deploy.pull import pull as pull_version

    path = pull_version(model, fmt, Path(dest), quantize=quantize)
    click.echo(f"{path} and {Path(dest) / 'model_card.json'}")

PREDICT_EXAMPLES = """Examples:

\b
  cifarflow predict cifarflow-cnn@champion photos/ --out preds.csv
  cifarflow predict RUN_ID cat.jpg dog.png --out -          CSV on stdout, nothing else
  cifarflow predict models:/m-... images.tar.gz --tta flip --skip-corrupt --out preds.parquet
"""


def _predict_out(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--out: a known format (.csv, .json, .parquet or -) in a writable folder, refused before any work."""
    from cifarflow.deploy.predict import check_out

    check_out(value)
    if value != "-":
        check_output(value, "--out", folder=False)
    return value


@cli.command("predict", epilog=PREDICT_EXAMPLES)
@click.argument("model")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--out", default="-", show_default=True, callback=_predict_out,
              help="preds.csv, .json or .parquet; - writes CSV to stdout (and nothing else).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images decoded and predicted at a time.")
@click.option("--tta", type=click.Choice(list(TTA_MODES)), default="none", show_default=True,
              help="Average each image's probabilities with its mirror's (flip) or airbench's six views.")
@click.option("--skip-corrupt", is_flag=True, help="Leave unreadable files out (one line each on stderr) instead of failing.")
@click.option("--quiet", is_flag=True, help="No progress bar (it is shown on stderr when that is a terminal).")
def predict_command(model, paths, out, batch_size, tta, skip_corrupt, quiet) -> None:
    """Label the images in PATH... (files, folders, .tar.gz/.zip) with MODEL (NAME@ALIAS, models:/..., run id).

    Columns: path, label, probability, then one probability per class.
    """
    from cifarflow.deploy.predict import predict

    result = predict(model, paths, out, batch_size=batch_size, tta=tta, skip_corrupt=skip_corrupt,
                     progress=False if quiet else None, report=lambda line: click.echo(line, err=True))
    if out != "-":
        skipped = f", {len(result.unreadable)} unreadable skipped" if result.unreadable else ""
        click.echo(f"{len(result.table)} images -> {out}{skipped}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the click group; fixable errors exit 2 with one line on stderr."""
    try:
        cli.main(args=argv, prog_name="cifarflow", standalone_mode=False)
    except CifarflowError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

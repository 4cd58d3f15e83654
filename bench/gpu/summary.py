"""Summary table of a bench/gpu/run.sh run, read from its MLflow store and its steps file.

One row per step: run id, test accuracy with and without TTA, training images/s (median over
the epochs after the first, which holds the XLA compilation; the only epoch when there is
one), train_seconds, epochs, and the step's wall time and status as run.sh recorded them
(``steps.jsonl``: one JSON object per line with ``step``, ``status``, ``wall_s`` and, for
cifarflow steps, ``run_id``; airbench's reference carries its own figures). Then the ratio of
step 2, `fast` against airbench94, and a status line.

    python bench/gpu/summary.py --store OUT/mlflow.db --steps OUT/steps.jsonl [--out OUT/summary.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_steps(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_figures(client, run_id: str) -> dict:
    """The figures of one MLflow run (missing ones are None)."""
    run = client.get_run(run_id)
    m, params = run.data.metrics, run.data.params
    ips = [x.value for x in sorted(client.get_metric_history(run_id, "images_per_second"), key=lambda x: x.step)]
    return {
        "test_accuracy": m.get("test_accuracy"), "test_accuracy_tta": m.get("test_accuracy_tta"),
        "images_per_second": statistics.median(ips[1:] or ips) if ips else None,
        "train_seconds": m.get("train_seconds"), "epochs": len(ips) or params.get("epochs"),
        "status": run.info.status, "tta": params.get("tta"),
    }


def _fmt(value, spec: str = ".4f") -> str:
    if value is None or value == "":
        return ""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def build(store: str, steps: list[dict]) -> tuple[str, dict]:
    """``(markdown, figures by step)``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store if "://" in store else f"sqlite:///{Path(store).absolute()}")
    rows, figures = [], {}
    header = ["step", "run id", "test_accuracy", "test_accuracy_tta", "images/s", "train s", "epochs",
              "wall s", "status"]
    for s in steps:
        f = {}
        if s.get("run_id"):
            try:
                f = run_figures(client, s["run_id"])
            except Exception as exc:  # a run the store does not hold: say so in the row
                f = {"status": f"not in store ({type(exc).__name__})"}
        elif s.get("runs"):  # airbench94's reference: its last (warm) run, cold in its own row below
            last = s["runs"][-1]
            f = {"test_accuracy_tta": last.get("tta_accuracy"), "train_seconds": last.get("total_time_seconds"),
                 "epochs": s.get("epochs")}
        figures[s["step"]] = {**s, **f}
        status = s.get("status", "")
        if f.get("status") and f["status"] != "FINISHED":
            status = f"{status} (run {f['status']})"
        rows.append([s["step"], s.get("run_id", ""), _fmt(f.get("test_accuracy")), _fmt(f.get("test_accuracy_tta")),
                     _fmt(f.get("images_per_second"), ".0f"), _fmt(f.get("train_seconds"), ".1f"),
                     _fmt(f.get("epochs"), "d") if isinstance(f.get("epochs"), int) else _fmt(f.get("epochs")),
                     _fmt(s.get("wall_s"), ".0f"), status])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = []
    fast, ref = figures.get("fast"), figures.get("airbench94")
    if fast and ref and ref.get("runs") and fast.get("train_seconds"):
        for r in ref["runs"]:
            kind = "cold" if r["run"] == 0 else "warm"
            t = r.get("total_time_seconds")
            if t:
                notes.append(f"fast vs airbench94 ({kind} run {r['run']}): train_seconds {fast['train_seconds']:.1f} s / "
                             f"{t:.2f} s = {fast['train_seconds'] / t:.2f}x; TTA accuracy "
                             f"{_fmt(fast.get('test_accuracy_tta'))} vs {r['tta_accuracy']:.4f}; "
                             f"wall {fast.get('wall_s', 0):.0f} s (whole command) vs {r['wall_s']:.1f} s (main())")
    for s in steps:
        f = figures[s["step"]]
        if s.get("budget_s") is not None:
            probe = s.get("probe") or {}
            trained = f.get("train_seconds")
            notes.append(f"{s['step']}: budget {s['budget_s']} s -> {s.get('planned_epochs')} epochs from the probe "
                         f"({_fmt(probe.get('epoch_seconds'), '.2f')} s per epoch projected, "
                         f"{_fmt(probe.get('compile_seconds'), '.1f')} s compiling); "
                         f"train_seconds {_fmt(trained, '.1f') or 'not logged'}")
        if s.get("note"):
            notes.append(f"{s['step']}: {s['note']}")
    ok = sum(1 for s in steps if s.get("status") in ("ok", "skipped"))
    status = f"status: {ok}/{len(steps)} steps ok or skipped as planned" + (
        "" if ok == len(steps) else f"; not ok: {', '.join(s['step'] for s in steps if s.get('status') not in ('ok', 'skipped'))}")
    text = "\n".join(lines + [""] + [f"- {n}" for n in notes] + ["", status]) + "\n"
    return text, figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="the MLflow SQLite file (or a tracking URI)")
    p.add_argument("--steps", required=True, help="run.sh's steps.jsonl")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    p.add_argument("--title", default="bench/gpu/run.sh summary")
    args = p.parse_args(argv)
    text, _ = build(args.store, read_steps(Path(args.steps)))
    text = f"## {args.title}\n\n{text}"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

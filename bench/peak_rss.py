"""Peak resident memory (RSS) of a full-data training run, through the command line.

Runs ``cifarflow train RECIPE --data DATA --epochs N --quiet`` in a child
process with its own empty data cache, checkpoint folder and SQLite MLflow
store (so the run includes decoding the archive, the worst case), and reports:

- the kernel's high-water mark of the largest process (``ru_maxrss`` of the
  waited-for children: exact, nothing sampled), and
- the largest sum over the process tree seen by sampling ``/proc`` every
  0.2 s (children such as ``git`` included; a sampled lower bound).

The peak is reached in the first epoch (data decoded and held, model, optimizer
and input pipeline built, one pass over the training set, the test evaluation
and the model logging after it); later epochs repeat the same allocations, so
``--epochs 1`` (the default) measures the peak of a full run. Goal for
``cnn_small``: at most 4 GiB.

    python bench/peak_rss.py --data ../shared/data/cifar10-jpeg.tar.gz
    python bench/peak_rss.py cnn --data ../shared/data/cifar10-jpeg.tar.gz --epochs 2
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

GIB = 1024**3


def tree_rss(pid: int) -> int:
    """Sum of VmRSS (bytes) of ``pid`` and its descendants, from /proc; 0 if it is gone."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@click.command()
@click.argument("recipe", default="cnn_small")
@click.option("--data", required=True, help="The full CIFAR-10 (folder or archive).")
@click.option("--epochs", default=1, show_default=True, help="Epochs (the peak is reached in the first).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Recipe overrides.")
@click.option("--keep", is_flag=True, help="Keep the run's temporary store and cache (path printed).")
def main(recipe, data, epochs, sets, keep) -> None:
    work = Path(tempfile.mkdtemp(prefix="peak-rss-"))
    env = {**os.environ, "CIFARFLOW_CACHE": str(work / "cache"), "CIFARFLOW_CHECKPOINTS": str(work / "checkpoints"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "KERAS_HOME": str(work / "keras")}
    exe = os.path.join(os.path.dirname(sys.executable), "cifarflow")
    command = [exe, "train", recipe, "--data", os.path.abspath(data), "--epochs", str(epochs), "--quiet",
               *[a for s in sets for a in ("--set", s)]]
    print("$ " + " ".join(command), flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, cwd=work)
    peak_tree = 0

    def sample():
        nonlocal peak_tree
        while proc.poll() is None:
            peak_tree = max(peak_tree, tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    sampler.join()
    wall = time.monotonic() - started
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    print(f"exit status {proc.returncode}; wall {wall:.0f} s (includes decoding the archive into an empty cache)")
    print(f"peak RSS, largest process (kernel high-water mark): {maxrss / GIB:.2f} GiB")
    print(f"peak RSS, process tree (sampled every 0.2 s):       {peak_tree / GIB:.2f} GiB")
    print(f"goal <= 4 GiB: {'met' if max(maxrss, peak_tree) <= 4 * GIB else 'NOT met'}")
    if keep:
        print(f"store and cache kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()

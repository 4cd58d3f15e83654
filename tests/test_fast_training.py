"""Training pieces from airbench94, usable by any recipe: triangular schedule, per-variable learning
rates, variables frozen after N steps, lookahead EMA."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cifarflow.training.optim import SGD, Triangular


def test_triangular_schedule_corners():
    # airbench94 L381-390 with 476 steps (9.9 epochs of 48 batches): warmup int(0.23 * 476) = 109
    lr = Triangular(peak=1.5, total_steps=476, warmup_steps=109, start=0.2, end=0.07)
    at = lambda s: float(lr(s))  # noqa: E731
    assert at(0) == pytest.approx(0.3)  # start * peak
    assert at(109) == pytest.approx(1.5)  # the top
    assert at(476) == pytest.approx(0.105)  # end * peak
    assert at(54.5) == pytest.approx(1.5 * (0.2 + 0.8 * 0.5))  # linear up
    assert at(109 + (476 - 109) / 2) == pytest.approx(1.5 * (1 + 0.07) / 2)  # linear down
    assert at(600) == pytest.approx(0.105)  # stays at the end value
    assert keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(lr)).get_config() == lr.get_config()
    with pytest.raises(ValueError):
        Triangular(1.0, total_steps=10, warmup_steps=10)


def _two_variable_model():
    inputs = keras.Input((2,))
    a = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="a")(inputs)
    b = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="b")(inputs)
    return keras.Model(inputs, keras.layers.Add()([a, b]))


def _fit(optimizer, steps, model=None):
    model = model or _two_variable_model()
    model.compile(optimizer=optimizer, loss="mse")
    x = np.ones((4, 2), "float32")
    y = np.zeros((4, 1), "float32")
    before = {w.path: w.numpy().copy() for w in model.trainable_weights}
    model.fit(x, y, batch_size=4, epochs=steps, shuffle=False, verbose=0)
    return model, before


def test_lr_multiplier_scales_the_step_not_the_weight_decay():
    opt = SGD(0.01, lr_multipliers={"^b/": 64.0})
    model, before = _fit(opt, 1)
    step = {w.path: before[w.path] - w.numpy() for w in model.trainable_weights}
    np.testing.assert_allclose(step["b/kernel"], 64 * step["a/kernel"], rtol=1e-5)
    assert step["a/kernel"].min() > 0
    # weight decay (decoupled) uses the base rate for both
    opt = SGD(1e-9, weight_decay=0.5, lr_multipliers={"^b/": 64.0})
    model, before = _fit(opt, 1)
    np.testing.assert_allclose(model.get_layer("a").kernel.numpy(), model.get_layer("b").kernel.numpy(), rtol=1e-6)


def test_freeze_after_stops_every_update_of_the_variable():
    opt = SGD(0.01, momentum=0.85, nesterov=True, weight_decay=0.1, freeze_after={"^b/": 2})
    model, _ = _fit(opt, 2)
    after_two = model.get_layer("b").kernel.numpy().copy()
    a_two = model.get_layer("a").kernel.numpy().copy()
    assert not np.allclose(after_two, 1.0)  # it trained for two steps
    model.fit(np.ones((4, 2), "float32"), np.zeros((4, 1), "float32"), batch_size=4, epochs=3, verbose=0)
    np.testing.assert_array_equal(model.get_layer("b").kernel.numpy(), after_two)  # no gradient, momentum or decay
    assert not np.allclose(model.get_layer("a").kernel.numpy(), a_two)


def _simulate_lookahead(steps, every, decay, lr=0.05):
    """airbench94's loop (L419-436) on the model y = x.(w_a + w_b), plain SGD, in NumPy."""
    w = np.ones(2)  # the two kernels, a and b: (2,) each, identical, so track one and double
    ema = w.copy()
    x = np.ones(2)
    for step in range(1, steps + 1):
        pred = 2 * x @ w
        grad = 2 * pred * x  # d/dw of (pred - 0)^2, pred depends on w through both kernels
        w = w - lr * grad
        if step % every == 0:
            d = decay * (step / steps) ** 3
            ema = d * ema + (1 - d) * w
            w = ema.copy()
        if step == steps:
            w = ema.copy()
    return w, ema


def test_lookahead_ema_is_what_gets_evaluated():
    steps, every, decay = 12, 5, 0.95**5
    opt = SGD(0.05, lookahead_steps=every, lookahead_decay=decay, lookahead_total_steps=steps)
    model, _ = _fit(opt, steps)
    expected, _ = _simulate_lookahead(steps, every, decay)
    final = model.get_layer("a").kernel.numpy().ravel()
    np.testing.assert_allclose(final, expected, rtol=1e-5)  # the weights after fit are the EMA ...
    np.testing.assert_allclose(opt._lookahead[0].numpy().ravel(), final, rtol=1e-6)
    plain, _ = _fit(SGD(0.05), steps)
    raw = plain.get_layer("a").kernel.numpy().ravel()
    assert np.abs(raw - final).max() > 1e-3  # ... and differ from the raw SGD weights
    x = np.ones((4, 2), "float32")
    np.testing.assert_allclose(model.predict(x, verbose=0).ravel(), 2 * x @ final, rtol=1e-5)  # evaluated


def test_lookahead_between_syncs_keeps_raw_and_average_apart():
    opt = SGD(0.05, lookahead_steps=5, lookahead_total_steps=100)
    model, _ = _fit(opt, 7)  # last sync at step 5; two raw steps since
    raw = model.get_layer("a").kernel.numpy()
    assert np.abs(opt._lookahead[0].numpy() - raw).max() > 1e-4


def test_optimizer_config_round_trips():
    opt = SGD(0.1, momentum=0.85, nesterov=True, lr_multipliers={"beta$": 64.0}, freeze_after={"whiten/bias": 96},
              lookahead_steps=5, lookahead_total_steps=480)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, SGD) and again.get_config() == opt.get_config()


def _positional_model(num_classes=4, seed=0):
    """Logits depend on where each pixel is, so mirrors and shifts change the output."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inputs)
    init = keras.initializers.RandomNormal(stddev=5e-4, seed=seed)  # logits of a few units on 0..255 pixels
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init)(x)
    return keras.Model(inputs, outputs)


def test_multiview_tta_averages_exactly_the_six_views():
    from cifarflow.evaluation.metrics import predict_probs

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 8, 8, 3)).astype(np.float32)
    model = _positional_model()

    def shifted(img, d):  # content moves by d (+1: down-right), borders reflected without repeating the edge
        idx = np.abs(np.arange(8) - d)
        idx = np.where(idx > 7, 14 - idx, idx)
        return img[:, idx][:, :, idx]

    views = [(0.25, x), (0.25, x[:, :, ::-1])]
    for d in (1, -1):
        views += [(0.125, shifted(x, d)), (0.125, shifted(x, d)[:, :, ::-1])]
    # airbench94 L320-334 averages logits; log-probabilities differ from them by a per-view constant
    log_mean = sum(w * np.log(model.predict(v, verbose=0).astype(np.float64)) for w, v in views)
    expected = np.exp(log_mean - log_mean.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    got = predict_probs(model, x, tta="multiview")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(got - predict_probs(model, x, tta="flip")).max() > 1e-4  # the shifted views count
    np.testing.assert_allclose(shifted(x, 1)[:, 1:, 1:], x[:, :-1, :-1])  # the helper shifts as it says


def test_alternating_flip_flips_every_image_on_alternate_epochs():
    from cifarflow.data import pipeline

    n = 16
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    y = np.arange(n)  # the label identifies the image
    flip = pipeline.AlternatingFlip(seed=3)
    ds = pipeline.make_dataset(flip.prepare(x), y, n, batch_size=5, training=True, alternate=flip)
    seen = []

    class Recorder(keras.Model):
        def train_step(self, data):
            images, labels = data
            seen[-1].update({int(i): np.asarray(img) for i, img in zip(np.argmax(labels, 1), images)})
            return {"images": float(len(images))}

    inputs = keras.Input((8, 8, 3))
    model = Recorder(inputs, keras.layers.Flatten()(inputs))
    model.compile(run_eagerly=True)

    class NewEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append({})

    model.fit(ds, epochs=4, callbacks=[NewEpoch(), flip], verbose=0, shuffle=False)
    mirrored = [np.array_equal(seen[0][i], x[i, :, ::-1]) for i in range(n)]
    assert 0 < sum(mirrored) < n  # epoch 0: a random part of the images is mirrored (derandomized: fixed)
    assert all(mirrored[i] or np.array_equal(seen[0][i], x[i]) for i in range(n))
    for epoch in (1, 2, 3):
        for i in range(n):  # every image is the mirror of itself one epoch earlier
            np.testing.assert_array_equal(seen[epoch][i], seen[epoch - 1][i][:, ::-1])


def test_portable_optimizer_is_built_in_with_the_current_rate():
    from cifarflow.training.optim import portable

    opt = SGD(Triangular(1.0, 10, 2), momentum=0.85, nesterov=True, weight_decay=0.01, lr_multipliers={"b": 2.0},
              lookahead_steps=5, lookahead_total_steps=10)
    model, _ = _fit(opt, 3)
    plain = portable(model.optimizer)
    assert type(plain) is keras.optimizers.SGD
    assert plain.momentum == 0.85 and plain.nesterov and plain.weight_decay == 0.01
    assert float(plain.learning_rate) == pytest.approx(float(Triangular(1.0, 10, 2)(3)))
    cosine = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 10))
    assert portable(cosine) is cosine  # already loads anywhere


def test_fast_recipe_trains_end_to_end_with_its_settings(train_data, monkeypatch):
    """`cifarflow train fast` on tiny data: whitening from data, the rules optimizer with lookahead, alternating
    flip, multiview TTA logged with its view count, and a logged model that loads with plain Keras."""
    import subprocess
    import sys

    import mlflow

    from cifarflow import config, models
    from cifarflow.training import trainer

    seen = {}
    original_init = models.DATA_INIT["fast"]
    monkeypatch.setitem(models.DATA_INIT, "fast", lambda m, x: (seen.setdefault("init", len(x)), original_init(m, x)))
    fits = []
    original_fit = keras.Model.fit
    monkeypatch.setattr(keras.Model, "fit", lambda self, *a, **k: (fits.append((self.optimizer, k["callbacks"])),
                                                                   original_fit(self, *a, **k))[1])
    cfg = config.resolve("fast", {"data": str(train_data), "epochs": 2, "batch_size": 16, "widths": [8, 8, 8],
                                  "data_init_images": 40, "freeze_after_epochs": {"^whiten/bias$": 1}})
    result = trainer.train(cfg, quiet=True)
    assert seen["init"] == 40  # a sample of the training images whitens the first layer
    optimizer, callbacks = fits[0]
    assert isinstance(optimizer, SGD) and optimizer.lookahead_steps == 5 and optimizer.lookahead_total_steps == 2 * 5
    assert isinstance(optimizer._learning_rate, Triangular)
    assert any(type(c).__name__ == "AlternatingFlip" for c in callbacks)
    run = mlflow.tracking.MlflowClient().get_run(result.run_id)
    assert run.data.params["tta"] == "multiview" and run.data.params["tta_views"] == "6"
    assert "test_accuracy_tta" in run.data.metrics
    local = mlflow.artifacts.download_artifacts(result.model_uri)
    code = ("import sys, glob, numpy as np, keras; f = glob.glob(sys.argv[1] + '/**/*.keras', recursive=True)[0]; "
            "m = keras.saving.load_model(f); print(m.predict(np.zeros((2, 32, 32, 3)), verbose=0).shape)")
    out = subprocess.run([sys.executable, "-c", code, local], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(2, 3)" in out.stdout  # 3 classes in the tiny data


def test_fast_recipe_optimizer_follows_airbench94():
    from cifarflow import config
    from cifarflow.training.trainer import make_optimizer

    cfg = config.resolve("fast")
    opt = make_optimizer(cfg, steps_per_epoch=49)  # 50,000 images at batch 1024
    total = 10 * 49
    schedule = opt._learning_rate
    assert isinstance(opt, SGD) and opt.momentum == 0.85 and opt.nesterov
    assert (schedule.peak, schedule.total_steps, schedule.warmup_steps) == (1.5, total, round(0.23 * total))
    assert float(schedule(0)) == pytest.approx(0.3) and float(schedule(total)) == pytest.approx(0.105)
    assert opt.weight_decay == pytest.approx(0.0153 / ((1 + 1 / 0.15) * 0.15 * 1.5), rel=1e-3)  # see fast.yaml
    assert opt.lr_multipliers == {"beta$": 64.0} and opt.freeze_after == {"^whiten/bias$": 3 * 49}
    assert (opt.lookahead_steps, opt.lookahead_total_steps) == (5, total)
    assert opt.lookahead_decay == pytest.approx(0.95**5)
    short = make_optimizer(config.resolve("fast", {"epochs": 4}), steps_per_epoch=49)._learning_rate
    assert short.warmup_steps == round(0.23 * 4 * 49)  # the peak stays at 23% of a shorter run
    plain = make_optimizer(config.resolve("cnn_small"), steps_per_epoch=10)
    assert type(plain) is keras.optimizers.SGD  # recipes without rules keep Keras' own optimizer


def test_bad_variable_pattern_is_a_user_error():
    from cifarflow import config
    from cifarflow.errors import CifarflowError

    with pytest.raises(CifarflowError, match="bad variable pattern"):
        config.resolve("fast", {"lr_multipliers": {"beta[": 2.0}})

"""The ``fast`` network: airbench94's net (Jordan 2024) in Keras 3.

Reference: Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU",
arXiv 2404.00498, and ``legacy/airbench94.py`` of github.com/KellerJordan/cifar10-airbench
(commit f1c599c; "L<n>" below are its line numbers). This is our own Keras code,
checked against that script piece by piece:

- frozen 2x2 patch-whitening first convolution, 24 filters (eigenvectors of the
  patch covariance and their negatives, scaled by ``1/sqrt(eigenvalue + 5e-4)``),
  with a bias, then GELU (L216-220, L230, L242-257; paper: "Frozen patch-whitening
  initialization"): :class:`PatchWhitening`, initialised by :func:`initialize_from_data`;
- three blocks conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU of widths
  64/256/256, convs without bias (L179-208, L54-58);
- the first ``in_channels`` filters of every 3x3 conv initialised to the identity
  (``dirac_``), the others with PyTorch's default init (L183-188; paper: "Identity
  initialization"): :class:`PartialIdentity`;
- BatchNorm without a learned scale, epsilon 1e-12, running statistics
  ``0.6 * running + 0.4 * batch`` (L171-177: ``hyp['net']['batchnorm_momentum'] = 0.6``
  is passed to PyTorch as ``momentum=1-0.6``; PyTorch's ``running = (1-m) running + m batch``
  with m = 0.4 is Keras' ``moving = momentum * moving + (1 - momentum) batch`` with
  ``momentum = 0.6``);
- max-pool 3 to 1x1, a bias-free linear layer and logits multiplied by 1/9
  (L225-228, L60).

The input contract of the platform holds: raw 0..255 pixels in (the per-channel
normalization of L69-70/L111 is a layer inside the model), float32 softmax out.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import layers, ops

from cifarflow.models.layers import pixel_input



def torch_default_init(seed=None) -> keras.initializers.Initializer:
    """PyTorch's default Conv2d/Linear kernel init, ``kaiming_uniform_(a=sqrt(5))``:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance scaling 1/3, fan-in, uniform."""
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)


@keras.saving.register_keras_serializable(package="cifarflow")
class PartialIdentity(keras.initializers.Initializer):
    """Conv kernel init: identity ("dirac") filters first, PyTorch's default init for the rest.

    For a kernel of shape ``(kh, kw, in, out)`` with ``out >= in``, output filter
    ``o < in`` is 1 at the centre tap of input channel ``o`` and 0 elsewhere, so the
    convolution starts by passing its input through on its first ``in`` channels
    (airbench94 L183-188, ``torch.nn.init.dirac_(w[:w.size(1)])``). The other
    ``out - in`` filters come from PyTorch's default init (:func:`torch_default_init`).
    """

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        w = torch_default_init(self.seed)(shape, dtype=dtype)
        n = min(cin, cout)
        eye = np.zeros(shape, dtype="float32")
        eye[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        keep = np.ones((1, 1, 1, cout), dtype="float32")
        keep[..., :n] = 0.0
        return ops.cast(w * keep + eye, dtype or "float32")

    def get_config(self):
        return {"seed": self.seed}


def patch_whitening_kernel(x: np.ndarray, kernel_size: int = 2, eps: float = 5e-4) -> np.ndarray:
    """Whitening filters from the patches of ``x`` (airbench94 L242-257).

    Takes every ``kernel_size`` x ``kernel_size`` patch (stride 1) of ``x``, forms the
    uncentred patch covariance ``P^T P / n``, and returns its eigenvectors, in
    decreasing eigenvalue order, each divided by ``sqrt(eigenvalue + eps)``, followed
    by their negatives. A valid convolution with these filters maps the patches to
    coordinates of (nearly) identity covariance.

    Args:
        x: float array (N, H, W, C), the inputs of the layer (normalized pixels).
        kernel_size: patch height and width.
        eps: added to the eigenvalues (same units as ``x**2``).

    Returns:
        float32 kernel (kernel_size, kernel_size, C, 2 * C * kernel_size**2) in
        Keras' ``Conv2D`` layout.
    """
    x = np.asarray(x, dtype=np.float64)
    n, h, w, c = x.shape
    k = kernel_size
    # (N, H-k+1, W-k+1, k, k, C): the patch at each position, in the kernel's (kh, kw, C) order
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))  # (N, H', W', C, k, k)
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * c)
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)  # column j: filter j
    kernel = np.concatenate([filters, -filters], axis=1)
    return kernel.reshape(k, k, c, 2 * k * k * c).astype(np.float32)


@keras.saving.register_keras_serializable(package="cifarflow")
class PatchWhitening(layers.Layer):
    """Frozen patch-whitening convolution with a trainable bias (airbench94 L216-220, L230).

    A valid ``kernel_size`` x ``kernel_size`` convolution with ``2 * C * kernel_size**2``
    output channels whose kernel is not trainable: :meth:`adapt` sets it to
    :func:`patch_whitening_kernel` of sample inputs. The bias (zeros at first)
    trains; the recipe may stop it after some epochs (``freeze_after``).

    Input ``(batch, H, W, C)``; output ``(batch, H - k + 1, W - k + 1, 2 C k^2)``.
    """

    adapts_to_data = True  # :func:`initialize_from_data` calls adapt() with this layer's inputs

    def __init__(self, kernel_size: int = 2, eps: float = 5e-4, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.eps = eps

    def build(self, input_shape):
        c = input_shape[-1]
        k = self.kernel_size
        self.filters = 2 * c * k * k
        self.kernel = self.add_weight(name="kernel", shape=(k, k, c, self.filters),
                                      initializer=PartialIdentity(), trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        y = ops.conv(x, ops.cast(self.kernel, x.dtype), strides=1, padding="valid")
        return y + ops.cast(self.bias, y.dtype)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        k = self.kernel_size
        return (b, None if h is None else h - k + 1, None if w is None else w - k + 1, 2 * c * k * k)

    def adapt(self, x: np.ndarray) -> None:
        """Set the kernel to the whitening filters of the patches of ``x`` (N, H, W, C)."""
        self.kernel.assign(patch_whitening_kernel(x, self.kernel_size, self.eps))

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "eps": self.eps}


def initialize_from_data(model: keras.Model, x: np.ndarray, batch_size: int = 500) -> list[str]:
    """Data-dependent initialisation: ``adapt`` every layer marked ``adapts_to_data``.

    Each such layer gets the values that reach its input when ``x`` (raw 0..255
    pixels, e.g. 5,000 training images as in airbench94 L402-403) is fed to the
    model, computed in inference mode.

    Returns:
        The names of the layers adapted (empty for models without such layers).
    """
    done = []
    for layer in model.layers:
        if getattr(layer, "adapts_to_data", False):
            probe = keras.Model(model.inputs, layer.input)
            layer.adapt(np.asarray(probe.predict(np.asarray(x, dtype="float32"), batch_size=batch_size, verbose=0)))
            done.append(layer.name)
    return done


def _conv_group(x, width: int, momentum: float, epsilon: float, name: str):
    """conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU (airbench94 L190-208)."""
    for i in (1, 2):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity(),
                          name=f"{name}_conv{i}")(x)
        if i == 1:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = layers.BatchNormalization(momentum=momentum, epsilon=epsilon, scale=False, name=f"{name}_bn{i}")(x)
        x = layers.Activation("gelu", name=f"{name}_gelu{i}")(x)
    return x


def build_fast(
    num_classes: int = 10,
    widths: tuple[int, int, int] = (64, 256, 256),
    whiten_kernel_size: int = 2,
    batchnorm_momentum: float = 0.6,
    batchnorm_epsilon: float = 1e-12,
    logit_scale: float = 1 / 9,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> keras.Model:
    """airbench94's network (see the module docstring for each piece's source).

    About 1.97M parameters and 0.24 GFLOP per 32x32 image forward (airbench94's
    own figures: about 2M and 0.24). airbench95 uses ``widths=(128, 384, 384)``.
    Call :func:`initialize_from_data` with training images before training, or the
    first layer stays an (untrained, frozen) identity-like filter bank.

    Args:
        num_classes: output classes.
        widths: channels of the three conv groups.
        whiten_kernel_size: patch size of the whitening layer (2 in airbench94).
        batchnorm_momentum: Keras momentum of the BatchNorm moving statistics.
        batchnorm_epsilon: BatchNorm epsilon.
        logit_scale: multiplies the logits before the softmax.
        mean, std: per-channel pixel statistics (0..255) for the input normalization.

    Returns:
        ``keras.Model``: float32 ``(batch, 32, 32, 3)`` raw pixels -> float32
        ``(batch, num_classes)`` probabilities.

    Raises:
        ValueError: widths not three positive ints, or a bad momentum/scale.
    """
    if len(widths) != 3 or min(widths) < 1 or not 0 <= batchnorm_momentum < 1 or logit_scale <= 0:
        raise ValueError(f"bad fast parameters: widths={widths} batchnorm_momentum={batchnorm_momentum} "
                         f"logit_scale={logit_scale}")
    inputs, x = pixel_input(mean=mean, std=std)
    x = PatchWhitening(whiten_kernel_size, name="whiten")(x)
    x = layers.Activation("gelu", name="whiten_gelu")(x)
    for i, width in enumerate(widths, start=1):
        x = _conv_group(x, width, batchnorm_momentum, batchnorm_epsilon, f"block{i}")
    x = layers.MaxPooling2D(3, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(num_classes, use_bias=False, kernel_initializer=torch_default_init(), name="logits")(x)
    x = layers.Rescaling(logit_scale, name="logit_scale")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="fast")

"""The ``fast`` network: airbench94's net (Jordan 2024) in Keras 3.

Reference: Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU",
arXiv 2404.00498, and ``legacy/airbench94.py`` of github.com/KellerJordan/cifar10-airbench
(commit f1c599c; "L<n>" below are its line numbers). This is our own Keras code,
checked against that script piece by piece:

- frozen 2x2 patch-whitening first convolution, 24 filters (eigenvectors of the
  patch covariance and their negatives, scaled by ``1/sqrt(eigenvalue + 5e-4)``),
  with a bias, then GELU (L216-220, L230, L242-257; paper: "Frozen patch-whitening
  initialization"): a ``Conv2D`` named ``whiten`` with a frozen kernel, set by :func:`initialize_from_data`;
- three blocks conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU of widths
  64/256/256, convs without bias (L179-208, L54-58);
- the first ``in_channels`` filters of every 3x3 conv initialised to the identity
  (``dirac_``), the others with PyTorch's default init (L183-188; paper: "Identity
  initialization"): :func:`set_partial_identity`;
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
from keras import layers

from cifarflow.models.layers import pixel_input



def torch_default_init(seed=None) -> keras.initializers.Initializer:
    """PyTorch's default Conv2d/Linear kernel init, ``kaiming_uniform_(a=sqrt(5))``:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance scaling 1/3, fan-in, uniform."""
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)


def set_partial_identity(conv: layers.Conv2D) -> None:
    """Make the first ``in`` filters of a built conv layer identity ("dirac") filters.

    For a kernel ``(kh, kw, in, out)`` with ``out >= in``, output filter ``o < in``
    becomes 1 at the centre tap of input channel ``o`` and 0 elsewhere, so the
    convolution starts by passing its input through on its first ``in`` channels;
    the other filters keep their initial values (airbench94 L183-188,
    ``torch.nn.init.dirac_(w[:w.size(1)])``). Done on the values, not as an
    initializer, so that a saved model needs no custom class to load.
    """
    kernel = np.array(conv.kernel.numpy())
    kh, kw, cin, cout = kernel.shape
    n = min(cin, cout)
    kernel[..., :n] = 0.0
    kernel[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
    conv.kernel.assign(kernel)


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


def initialize_from_data(model: keras.Model, x: np.ndarray, eps: float = 5e-4, batch_size: int = 500) -> None:
    """Set the frozen kernel of the ``whiten`` layer from sample images (airbench94 L400-403).

    The layer's inputs for ``x`` (raw 0..255 pixels, 5,000 training images in
    airbench94), computed in inference mode, give :func:`patch_whitening_kernel`.

    Args:
        model: a model from :func:`build_fast`.
        x: images (N, 32, 32, 3), 0..255.
        eps: added to the eigenvalues.
    """
    layer = model.get_layer("whiten")
    probe = keras.Model(model.inputs, layer.input)
    inputs = np.asarray(probe.predict(np.asarray(x, dtype="float32"), batch_size=batch_size, verbose=0))
    layer.kernel.assign(patch_whitening_kernel(inputs, layer.kernel_size[0], eps))


def _conv_group(x, width: int, momentum: float, epsilon: float, name: str):
    """conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU (airbench94 L190-208)."""
    for i in (1, 2):
        conv = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=torch_default_init(),
                             name=f"{name}_conv{i}")
        x = conv(x)
        set_partial_identity(conv)
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
    # 2 * 3 * k^2 filters: the eigenvectors of the k x k patch covariance and their negatives (L217-218)
    whiten = layers.Conv2D(2 * 3 * whiten_kernel_size**2, whiten_kernel_size, padding="valid", use_bias=True,
                           name="whiten")
    x = whiten(x)
    whiten.kernel.trainable = False  # frozen (L230); :func:`initialize_from_data` sets it, the bias trains
    x = layers.Activation("gelu", name="whiten_gelu")(x)
    for i, width in enumerate(widths, start=1):
        x = _conv_group(x, width, batchnorm_momentum, batchnorm_epsilon, f"block{i}")
    x = layers.MaxPooling2D(3, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(num_classes, use_bias=False, kernel_initializer=torch_default_init(), name="logits")(x)
    x = layers.Rescaling(logit_scale, name="logit_scale")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="fast")

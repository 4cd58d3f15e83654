"""A small Vision Transformer for 32x32 images, trained from scratch."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers, ops

from cifarflow.models.layers import pixel_input


def build_vit(
    num_classes: int = 10,
    patch_size: int = 4,
    embed_dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 2.0,
    dropout: float = 0.1,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> keras.Model:
    """Vision Transformer (Dosovitskiy et al. 2021) sized for CIFAR-10.

    Follows the Keras example "Image classification with Vision Transformer"
    (and its small-dataset variant) without resizing: non-overlapping
    ``patch_size`` patches embedded by a strided conv, learned position
    embeddings, ``depth`` pre-norm encoder blocks (multi-head self-attention
    with ``heads`` heads, MLP of ``mlp_ratio`` x ``embed_dim`` with GELU,
    dropout), final LayerNorm, mean pooling over tokens, softmax. Only
    built-in Keras layers and ops, so a saved model reloads anywhere.
    Defaults (patch 4 -> 64 tokens, dim 192, depth 6, 3 heads): 1.8M params.

    Args:
        num_classes: output classes.
        patch_size: patch side in pixels; must divide 32.
        embed_dim: token width; must be divisible by ``heads``.
        depth: number of encoder blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``embed_dim``.
        dropout: dropout rate in attention, MLP and after the embedding.
        mean, std: per-channel pixel statistics (0..255) for the input normalization.

    Returns:
        ``keras.Model``: raw pixels -> float32 probabilities.

    Raises:
        ValueError: ``patch_size`` does not divide 32 or ``embed_dim`` % ``heads`` != 0.
    """
    if 32 % patch_size or embed_dim % heads:
        raise ValueError(f"patch_size must divide 32 and embed_dim be divisible by heads "
                         f"(got patch_size={patch_size}, embed_dim={embed_dim}, heads={heads})")
    tokens = (32 // patch_size) ** 2
    inputs, x = pixel_input(mean=mean, std=std)
    x = layers.Conv2D(embed_dim, patch_size, strides=patch_size, name="patch_embed")(x)
    x = layers.Reshape((tokens, embed_dim), name="tokens")(x)
    positions = ops.cast(ops.cumsum(ops.ones_like(x[..., 0]), axis=1) - 1, "int32")  # 0..tokens-1
    x = layers.Add(name="add_position")([x, layers.Embedding(tokens, embed_dim, name="position_embed")(positions)])
    x = layers.Dropout(dropout, name="embed_dropout")(x)
    for i in range(depth):
        name = f"block{i + 1}"
        y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
        y = layers.MultiHeadAttention(heads, embed_dim // heads, dropout=dropout, name=f"{name}_attention")(y, y)
        x = layers.Add(name=f"{name}_add1")([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
        y = layers.Dense(int(embed_dim * mlp_ratio), activation="gelu", name=f"{name}_mlp1")(y)
        y = layers.Dropout(dropout, name=f"{name}_mlp_dropout1")(y)
        y = layers.Dense(embed_dim, name=f"{name}_mlp2")(y)
        y = layers.Dropout(dropout, name=f"{name}_mlp_dropout2")(y)
        x = layers.Add(name=f"{name}_add2")([x, y])
    x = layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="vit")

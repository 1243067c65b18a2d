"""Vision Transformers for 32x32 inputs: timm's VisionTransformer with 4x4 patches (64 tokens plus
a CLS token, whose final state feeds the classifier).

Defaults follow the official GNP ViT: dropout 0.1 after the position embedding, the attention
projection and both MLP layers; attention dropout 0.1; JAX-style initialisation (zero classifier).
Parameters for 10 classes: vit_ti 5.36M, vit_s 21.34M, vit_b 85.15M.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


def _vit(num_classes: int, embed_dim: int, num_heads: int, depth: int, dropout: float,
         attn_dropout: float, drop_path_rate: float) -> VisionTransformer:
    # Imported here: timm's import (about 1 s) is not paid by runs of the other models.
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(
        img_size=32,
        patch_size=4,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        class_token=True,
        global_pool="token",
        pos_drop_rate=dropout,
        proj_drop_rate=dropout,
        attn_drop_rate=attn_dropout,
        drop_path_rate=drop_path_rate,
        weight_init="jax",
    )


def vit_ti(num_classes: int = 10, depth: int = 12, dropout: float = 0.1, attn_dropout: float = 0.1,
           drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-Ti/4: width 192, 3 heads."""
    return _vit(num_classes, 192, 3, depth, dropout, attn_dropout, drop_path_rate)


def vit_s(num_classes: int = 10, depth: int = 12, dropout: float = 0.1, attn_dropout: float = 0.1,
          drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-S/4: width 384, 6 heads (the paper's CIFAR ViT)."""
    return _vit(num_classes, 384, 6, depth, dropout, attn_dropout, drop_path_rate)


def vit_b(num_classes: int = 10, depth: int = 12, dropout: float = 0.1, attn_dropout: float = 0.1,
          drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-B/4: width 768, 12 heads."""
    return _vit(num_classes, 768, 12, depth, dropout, attn_dropout, drop_path_rate)

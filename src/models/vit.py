"""A plain Vision Transformer over patch sequences (pure nn.Module: no Lightning, no devices)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, StochasticDepth

from src.data.transforms import unpatchify
from src.errors import ConfigError

# How patches become tokens: one linear projection per patch (the ViT paper), or a small
# convolutional stem over the image the patches were cut from (Xiao et al. 2021, "Early
# convolutions help transformers see better"), which gives a small-data ViT a CNN's locality.
Tokenizer = Literal["patch", "conv"]
# What the head classifies: the class token (the ViT paper), or the mean of the patch tokens (timm's
# global_pool='avg'), which uses every token's output and suits small-data ViTs (Chen et al. 2021).
Pool = Literal["token", "avg"]


class ConvStem(nn.Module):
    """Patches -> tokens through stride-2 3x3 convolutions (BatchNorm, ReLU) and a 1x1 projection.

    log2(P) stride-2 convolutions shrink the image by the patch size, so the stem yields exactly the
    tokens the linear projection would: one per patch, in the same order. Widths double at each
    stage from `width`, or by default from dim / P (up to dim / 2); Xiao et al. double up to dim.
    """

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3, width: int = 0) -> None:
        super().__init__()
        stages = patch_size.bit_length() - 1
        if patch_size < 2 or 2**stages != patch_size:
            raise ConfigError(f"tokenizer 'conv' needs a patch_size that is a power of 2 (2, 4, 8, ...), got {patch_size}")
        self.patch_size = patch_size
        if width:  # the first convolution's channels, doubling at each stage
            widths = [width << i for i in range(stages)]
        else:
            widths = [max(16, dim >> (stages - i)) for i in range(stages)]  # e.g. dim 192, P 4: 48, 96
        layers, width = [], in_channels
        for out in widths:
            layers.append(Conv2dNormActivation(width, out, kernel_size=3, stride=2))  # conv, BN, ReLU
            width = out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(width, dim, kernel_size=1)

    def forward(self, patches: Tensor) -> Tensor:
        images = unpatchify(patches, self.patch_size)  # (B, C, H, W)
        x = self.proj(self.convs(images))  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), row by row like the patches


class ImageEmbedding(nn.Module):
    """Turn flattened patches into tokens, prepend the class token and add learned positions."""

    def __init__(
        self,
        patch_dim: int,
        num_patches: int,
        dim: int,
        dropout: float = 0.0,
        tokenizer: Tokenizer = "patch",
        patch_size: int | None = None,
        stem_width: int = 0,
    ) -> None:
        super().__init__()
        if tokenizer == "patch":
            self.proj = nn.Linear(patch_dim, dim)
        elif tokenizer == "conv":
            if patch_size is None:
                raise ConfigError("tokenizer 'conv' needs the patch_size")
            self.proj = ConvStem(patch_size, dim, patch_dim // (patch_size * patch_size), stem_width)
        else:
            raise ConfigError(f"tokenizer must be 'patch' or 'conv', got {tokenizer!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, patches: Tensor) -> Tensor:
        x = self.proj(patches)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, D)
        return self.drop(x)


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, all heads in one batched SDPA call."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # 1/sqrt(head_dim), as in the paper; not the token count
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, hd)
        return q, k, v

    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax attention weights (B, H, N, N), for pictures; training never needs them."""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def forward(self, x: Tensor, fused: bool | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if fused is None:
            # PyTorch's fused CPU kernel is 5-8x slower in bfloat16 than two batched matmuls and a
            # softmax, which run on the CPU's bf16 matrix units (bench/RESULTS.md, "attention kernel").
            fused = not (q.device.type == "cpu" and q.dtype == torch.bfloat16)
        if fused:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        else:
            out = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1) @ v  # (B, H, N, hd)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ViT(nn.Module):
    """Vision Transformer classifier on patchified images (B, N, P*P*C) -> logits (B, num_classes)."""

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        tokenizer: Tokenizer = "patch",
        global_pool: Pool = "token",
        stem_width: int = 0,
    ) -> None:
        super().__init__()
        for name, value in [("num_classes", num_classes), ("image_size", image_size),
                            ("patch_size", patch_size), ("in_channels", in_channels),
                            ("dim", dim), ("depth", depth), ("num_heads", num_heads)]:
            if value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if image_size % patch_size:
            raise ConfigError(f"patch_size={patch_size} does not divide image_size={image_size}")
        if mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be positive, got {mlp_ratio}")
        for name, value in [("dropout", dropout), ("drop_path", drop_path)]:
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if stem_width < 0 or (stem_width and tokenizer != "conv"):
            raise ConfigError(f"stem_width sizes the conv stem (tokenizer 'conv'): 0 (dim / patch_size) or a "
                              f"positive channel count; got {stem_width} with tokenizer {tokenizer!r}")
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.global_pool = global_pool

        self.num_patches = (image_size // patch_size) ** 2
        self.embed = ImageEmbedding(patch_size * patch_size * in_channels, self.num_patches, dim, dropout,
                                    tokenizer, patch_size, stem_width)
        # Stochastic depth grows linearly with depth: early blocks are almost always kept.
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, int(dim * mlp_ratio), dropout, rate) for rate in rates]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.embed.pos_embed, std=0.02)

    @staticmethod
    def no_weight_decay() -> set[str]:
        """Parameter names that are never decayed although they are not 1-D."""
        return {"embed.cls_token", "embed.pos_embed"}

    def forward_features(self, patches: Tensor) -> Tensor:
        """Normalised token features (B, N+1, D); index 0 is the class token."""
        return self.norm(self.blocks(self.embed(patches)))

    def pool(self, features: Tensor) -> Tensor:
        """One vector per image (B, D) from `forward_features`: the class token, or the patch tokens' mean."""
        return features[:, 0] if self.global_pool == "token" else features[:, 1:].mean(dim=1)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits (B, num_classes) from the pooled `forward_features`."""
        return self.head(self.pool(features))

    def forward(self, patches: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(patches))

    @torch.no_grad()
    def attention_maps(self, patches: Tensor) -> list[Tensor]:
        """Each block's attention weights (B, H, N+1, N+1), for rollout pictures."""
        x = self.embed(patches)
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_weights(block.norm1(x)))
            x = block(x)
        return maps


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms (timm/ViT init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""A plain Vision Transformer over patch sequences (pure nn.Module: no Lightning, no devices).

Its settings are declared once, as `ViT`'s arguments: the CLI's --model.* flags for them, the keys
that fix the architecture (`ARCHITECTURE`) and the values old checkpoints were trained with
(`SETTINGS_DEFAULTS`) all come from that signature. The top-level names are timm's
(`patch_embed`, `cls_token`, `pos_embed`, `blocks`, `norm`, `head`).
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, StochasticDepth

from src.errors import ConfigError
from src.images import patch_grid, unpatchify

# How patches become tokens: one linear projection per patch (the ViT paper), or a small
# convolutional stem over the image the patches were cut from (Xiao et al. 2021, "Early
# convolutions help transformers see better"), which gives a small-data ViT a CNN's locality.
Tokenizer = Literal["patch", "conv"]
# What the head classifies: the class token (the ViT paper), or the mean of the patch tokens (timm's
# global_pool='avg'), which uses every token's output and suits small-data ViTs (Chen et al. 2021).
Pool = Literal["token", "avg"]


class PatchEmbed(nn.Module):
    """Flattened patches (B, N, P*P*C) -> tokens (B, N, D) through one linear projection."""

    def __init__(self, patch_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches)  # (B, N, D)


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
        # Channels innermost, images and weights alike: the stem's forward and backward 1.3x faster on
        # a 2-core AVX2 CPU (oneDNN's layout; cuDNN's too for bf16), and the tokens come out contiguous.
        self.to(memory_format=torch.channels_last)

    def forward(self, patches: Tensor) -> Tensor:
        # (B, C, H, W), stored (B, H, W, C): convolutions see across patch borders
        images = unpatchify(patches, self.patch_size, channels_last=True)
        x = self.proj(self.convs(images))  # (B, D, H/P, W/P), stored (B, H/P, W/P, D)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), row by row like the patches


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, all heads in one batched SDPA call.

    `fused_attn` (timm's name) picks PyTorch's fused kernel or the manual matmul-softmax-matmul; it
    is set once per run by whoever knows the device and precision (`ViT.use_fused_attention`).
    """

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
        self.fused_attn = True

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, hd)
        return q, k, v

    def _weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The manual attention: softmax(q k^T / sqrt(head_dim)), (B, H, N, N)."""
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax attention weights (B, H, N, N), for pictures; training never needs them."""
        q, k, _ = self._qkv(x)
        return self._weights(q, k)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        else:
            out = self._weights(q, k) @ v  # (B, H, N, hd)
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
    """Vision Transformer classifier on patchified images (B, N, P*P*C) -> logits (B, num_classes).

    Its arguments are the network's settings, declared here only: the defaults are the CLI's.
    `dropout` and `drop_path` change training, not the weights' layout; every other setting is
    part of the architecture a checkpoint must match.
    """

    def __init__(
        self,
        # what it sees and says (under train.py, linked from the DataModule)
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        # its size
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
        # regularisation (training only)
        dropout: float = 0.0,
        drop_path: float = 0.1,
        # variants: conv stem instead of the patch projection, head on the mean token
        tokenizer: Tokenizer = "patch",
        global_pool: Pool = "token",
        stem_width: int = 0,
    ) -> None:
        # Every argument, for checkpoints: they rebuild this network from its settings alone.
        self.settings = {name: value for name, value in locals().items() if name in SETTINGS_DEFAULTS}
        super().__init__()
        for name, value in [("num_classes", num_classes), ("in_channels", in_channels), ("dim", dim),
                            ("depth", depth), ("num_heads", num_heads)]:
            if value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
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
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_patches = patch_grid(image_size, patch_size) ** 2

        if tokenizer == "patch":
            self.patch_embed: nn.Module = PatchEmbed(patch_size * patch_size * in_channels, dim)
        elif tokenizer == "conv":
            self.patch_embed = ConvStem(patch_size, dim, in_channels, stem_width)
        else:
            raise ConfigError(f"tokenizer must be 'patch' or 'conv', got {tokenizer!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        # Stochastic depth grows linearly with depth: early blocks are almost always kept.
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, int(dim * mlp_ratio), dropout, rate) for rate in rates]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def no_weight_decay() -> set[str]:
        """Parameter names that are never decayed although they are not 1-D."""
        return {"cls_token", "pos_embed"}

    def layer_id(self, name: str) -> int:
        """How deep parameter `name` sits, for layer-wise learning-rate decay (as BEiT and MAE fine-tune):
        0 for the embedding (`patch_embed`, `cls_token`, `pos_embed`), i + 1 for `blocks.i`, depth + 1
        for the final `norm` and the `head`."""
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def use_fused_attention(self, fused: bool) -> None:
        """Every block's attention through PyTorch's fused kernel (True) or the manual one (False)."""
        for block in self.blocks:
            block.attn.fused_attn = fused

    def embed(self, patches: Tensor) -> Tensor:
        """Tokens (B, N+1, D): the class token, then one per patch, with learned positions (resized to
        the patches' grid when the images are smaller than `image_size`: progressive resizing)."""
        x = self.patch_embed(patches)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + grid_positions(self.pos_embed, x.shape[1])  # (B, N+1, D)
        return self.pos_drop(x)

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


# The settings and their defaults, read from the one declaration above. A setting added later must
# default to what the network did before it existed: checkpoints saved without it get that value.
SETTINGS_DEFAULTS = {name: p.default for name, p in inspect.signature(ViT.__init__).parameters.items()
                     if name != "self"}
# The settings that fix the weights' layout: checkpoints fit exactly the networks built with the same values.
ARCHITECTURE = tuple(name for name in SETTINGS_DEFAULTS if name not in ("dropout", "drop_path"))
# Settings that checkpoints written before they existed do not record.
ADDED_LATER = ("in_channels", "tokenizer", "global_pool", "stem_width")


def grid_positions(pos_embed: Tensor, tokens: int) -> Tensor:
    """Position embeddings (1, 1+n, D) of a square grid of n tokens, for a square grid of `tokens`: the
    grid resized bicubically where it differs (as torchvision's `interpolate_embeddings`), the class token's
    kept. Differentiable, so a network trained on smaller images learns its own grid through it."""
    if pos_embed.shape[1] == tokens + 1:
        return pos_embed
    old, new = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(tokens)
    if old * old != pos_embed.shape[1] - 1 or new * new != tokens:
        raise ValueError(f"position embeddings of {pos_embed.shape[1] - 1} tokens for {tokens}: not square grids")
    grid = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=True)  # as torchvision does
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, tokens, -1)], dim=1)


def saved_settings(hparams: dict) -> dict:
    """A checkpoint's hyperparameters, with the settings added since it was written at their default."""
    return {**{name: SETTINGS_DEFAULTS[name] for name in ADDED_LATER}, **hparams}


def upgrade_state_dict(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A ViT state dict (its keys under `prefix`) with the names used before timm's (`embed.*`) renamed."""
    renamed = {}
    for key, tensor in state.items():
        name = key.removeprefix(prefix)
        if key.startswith(prefix) and name.startswith("embed.proj."):
            rest = name.removeprefix("embed.proj.")
            # The linear tokenizer was `embed.proj` itself; the conv stem's parts sat inside it.
            key = prefix + (f"patch_embed.proj.{rest}" if rest in ("weight", "bias") else f"patch_embed.{rest}")
        elif key.startswith(prefix) and name.startswith("embed."):  # cls_token, pos_embed
            key = prefix + name.removeprefix("embed.")
        renamed[key] = tensor
    return renamed


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms (timm/ViT init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

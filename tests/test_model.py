"""Tiny-model unit tests: shapes, attention numerics, gradients, optimiser groups, schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.errors import ConfigError
from src.hardware import fused_adamw
from src.models.classifier import ViTClassifier, param_groups, warmup_cosine
from src.images import patchify, resize_patches, unpatchify
from src.models.vit import Attention, ViT, grid_positions

TINY = dict(num_classes=5, image_size=16, patch_size=4, dim=32, depth=2, num_heads=4, mlp_ratio=2.0, drop_path=0.0)


def patches(batch: int = 3, image_size: int = 16, patch_size: int = 4) -> torch.Tensor:
    n = (image_size // patch_size) ** 2
    return torch.randn(batch, n, patch_size * patch_size * 3)  # (B, N, P*P*C)


def test_vit_shapes():
    model = ViT(**TINY)
    x = patches()
    features = model.forward_features(x)
    assert features.shape == (3, 16 + 1, 32)  # class token + 16 patches
    assert model.forward_head(features).shape == (3, 5)
    assert torch.equal(model(x), model.forward_head(features))
    maps = model.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (3, 4, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 4, 17))


def test_smaller_images_reach_the_network_as_fewer_tokens_at_resized_positions():
    # Progressive resizing: patches of 32 px images resized to 16 px are the patches of the 16 px images.
    ramp = torch.linspace(0, 1, 32)
    images = (ramp[None, :] + 2 * ramp[:, None]).expand(2, 3, 3, 32, 32)  # (B, V, C, H, W), smooth
    small = resize_patches(patchify(images, 4), 4, 16)  # (B, V, 16, 48)
    half = (2 * torch.arange(16) + 0.5) / 31  # the ramp at the 16 px image's pixel centres
    assert small.shape == (2, 3, 16, 48)
    error = (unpatchify(small, 4) - (half[None, :] + 2 * half[:, None])).abs()  # (B, V, C, 16, 16)
    assert error[..., 1:-1, 1:-1].max() < 1e-5  # a linear ramp stays exact away from the border
    full = patchify(images, 4)
    assert resize_patches(full, 4, 32) is full
    # The network's positions for the coarser grid come from its own grid (the class token's kept), and
    # training through them teaches the grid itself.
    model = ViT(**{**TINY, "image_size": 32})  # an 8x8 grid
    pos = grid_positions(model.pos_embed, 16)
    assert pos.shape == (1, 17, 32) and torch.equal(pos[0, 0], model.pos_embed[0, 0])
    assert grid_positions(model.pos_embed, 64) is model.pos_embed
    model(patches(image_size=16)).sum().backward()
    assert model.pos_embed.grad[0, 1:].abs().sum(-1).min() > 0  # every position of the 8x8 grid learnt


def test_fused_and_manual_attention_agree():
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=8).eval()
    x = torch.randn(4, 17, 64)
    fused = attn(x)
    attn.fused_attn = False
    manual = attn(x)
    assert torch.allclose(fused, manual, atol=1e-5, rtol=1e-5)
    # ...and the manual path is real attention: scaled by sqrt(head_dim), not by the token count.
    q, k, v = attn._qkv(x)
    expected = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    expected = attn.proj(expected.transpose(1, 2).reshape(4, 17, 64))
    assert torch.allclose(manual, expected, atol=1e-5)


def test_attention_heads_are_independent():
    """Changing the input of one head's slice of q/k/v only changes that head's output slice."""
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4).eval()
    q, k, v = (torch.randn(1, 4, 5, 8) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    v2 = v.clone()
    v2[:, 1] += 1.0
    out2 = F.scaled_dot_product_attention(q, k, v2)
    changed = (out2 - out).abs().amax(dim=(0, 2, 3))
    assert changed[1] > 0.5 and torch.all(changed[[0, 2, 3]] == 0)
    assert attn.scale == pytest.approx(8**-0.5)


def test_every_parameter_gets_a_gradient():
    model = ViT(**TINY)
    loss = F.cross_entropy(model(patches()), torch.tensor([0, 1, 2]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_no_nan_and_drop_path_only_in_training():
    model = ViT(**{**TINY, "drop_path": 0.5})
    x = patches()
    assert torch.isfinite(model(x)).all()
    model.eval()
    assert torch.equal(model(x), model(x))  # deterministic in eval: no stochastic depth, no dropout
    assert model.blocks[0].drop_path.p == 0.0 and model.blocks[-1].drop_path.p == pytest.approx(0.5)


def test_param_groups_complete_disjoint_and_right():
    model = ViT(**TINY)
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names.isdisjoint(no_decay_names)
    assert decay_names | no_decay_names == set(names.values())
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
            "head.weight"} <= decay_names
    assert all(model.get_parameter(n).ndim >= 2 for n in decay_names)


def test_init_is_truncated_normal():
    model = ViT(**{**TINY, "dim": 256, "depth": 1, "num_heads": 4})
    for weight in (model.blocks[0].mlp.fc1.weight, model.pos_embed, model.head.weight):
        assert weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=30, num_heads=4), "not divisible"),
        (dict(image_size=18), "does not divide"),
        (dict(depth=0), "depth must be a positive"),
        (dict(drop_path=1.0), "drop_path"),
    ],
)
def test_vit_rejects_impossible_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ViT(**{**TINY, **kwargs})


def test_warmup_cosine_schedule():
    lr = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.01) for s in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lr[:10], lr[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:110]))  # then never rising
    assert lr[60] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert lr[110] == pytest.approx(0.01) and lr[119] == pytest.approx(0.01)  # floor, not wrapping


def test_classifier_rejects_bad_values():
    with pytest.raises(ConfigError, match="lr"):
        ViTClassifier(lr=-1.0)
    for start_size, start_share in [(32, 0.5), (6, 0.5), (16, 0.0), (2, 0.5)]:  # image 32 px, patch 4
        with pytest.raises(ConfigError, match="progressive resizing"):
            ViTClassifier(image_size=32, patch_size=4, start_size=start_size, start_share=start_share)
    with pytest.raises(ConfigError, match="class names"):
        ViTClassifier(num_classes=3, class_names=["a", "b"])


def test_classifier_step_and_metrics():
    module = ViTClassifier(**TINY)
    batch = (patches(8), torch.randint(0, 5, (8,)))
    logits = module(batch[0])
    assert logits.shape == (8, 5)
    # num_classes <= 5: top-5 accuracy would be trivially 1, so it is not tracked.
    assert set(module.val_metrics.keys()) == {"val/acc"}
    assert set(ViTClassifier(num_classes=10).val_metrics.keys()) == {"val/acc", "val/acc5"}


@pytest.mark.parametrize("global_pool, peak", [("token", 2), ("avg", 9)])
def test_attention_rollout_explains_what_the_head_reads(monkeypatch, global_pool: str, peak: int):
    """A model whose class token attends only to patch 2 and whose patch tokens attend only to patch 9:
    the picture of a class-token head must point at 2, that of a mean-token head at 9."""
    from src.visualize import attention_rollout

    def fixed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        B, H, N, _ = q.shape
        weights = torch.zeros(B, H, N, N)
        weights[:, :, 0, 1 + 2] = 1.0  # the class token's row
        weights[:, :, 1:, 1 + 9] = 1.0  # every patch token's row
        return weights

    monkeypatch.setattr(Attention, "_weights", fixed)
    model = ViT(**{**TINY, "global_pool": global_pool}).eval()
    rollout = attention_rollout(model.attention_maps(patches()), model.global_pool)  # (B, 4, 4)
    assert rollout.shape == (3, 4, 4)
    assert (rollout.flatten(1).argmax(dim=1) == peak).all()
    assert torch.allclose(rollout.amax(dim=(1, 2)), torch.ones(3))
    with pytest.raises(ValueError, match="global_pool"):
        attention_rollout(model.attention_maps(patches()), "max")


def test_adamw_is_fused_where_pytorch_has_the_kernel_and_no_scaler_needs_unscaling():
    assert fused_adamw(torch.device("cpu"), "32-true") and fused_adamw(torch.device("cpu"), "bf16-mixed")
    assert not fused_adamw(torch.device("cuda"), "16-mixed")  # clipping needs Lightning to unscale first
    model = ViTClassifier(**TINY)
    optimizer = model.configure_optimizers()["optimizer"]
    assert all(group["fused"] for group in optimizer.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(patches()), torch.tensor([0, 1, 2])).backward()
    optimizer.step()  # the fused kernel runs here: every parameter moves
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

"""The contrastive term, two-view training steps and starting from a pre-trained backbone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.errors import ConfigError
from src.models.classifier import ViTClassifier, param_groups
from helpers import info_nce_reference
from src.models.losses import info_nce

TINY = dict(num_classes=5, image_size=16, patch_size=4, dim=32, depth=2, num_heads=4, mlp_ratio=2.0)


@pytest.mark.parametrize("batch", [2, 3, 8, 17])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_info_nce_equals_the_per_sample_reference(batch: int, temperature: float):
    generator = torch.Generator().manual_seed(batch)
    z1, z2 = torch.randn(2, batch, 6, generator=generator, dtype=torch.float64)
    assert float(info_nce(z1, z2, temperature)) == pytest.approx(info_nce_reference(z1, z2, temperature),
                                                                  rel=1e-5)


def test_info_nce_prefers_aligned_pairs_and_ignores_batch_order():
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=generator)
    z2 = z1 + 0.1 * torch.randn(32, 16, generator=generator)  # two views of the same images
    aligned = info_nce(z1, z2)
    shuffled = info_nce(z1, z2[torch.randperm(32, generator=generator)])
    assert aligned < shuffled - 1.0
    order = torch.randperm(32, generator=generator)
    assert info_nce(z1[order], z2[order]) == pytest.approx(float(aligned), rel=1e-5)
    assert info_nce(z2, z1) == pytest.approx(float(aligned), rel=1e-5)  # symmetric in the views
    with pytest.raises(ValueError):
        info_nce(z1, z2[:5])


def two_view_batch(model: ViTClassifier, batch: int = 4):
    n = (model.hparams.image_size // model.hparams.patch_size) ** 2
    return torch.randn(batch, 2, n, 4 * 4 * 3), torch.randint(0, model.hparams.num_classes, (batch,))


def test_contrastive_step_adds_the_weighted_term_and_trains_the_projector(monkeypatch):
    torch.manual_seed(0)
    model = ViTClassifier(**TINY, contrastive_weight=0.5, temperature=0.2)
    logged = {}
    monkeypatch.setattr(model, "log_dict", lambda values, **kw: logged.update(values))
    monkeypatch.setattr(model, "log", lambda name, value, **kw: logged.update({name: value}))
    loss = model.training_step(two_view_batch(model), 0)
    expected = logged["train/ce"] + 0.5 * logged["train/contrastive"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    grouped = {id(p) for group in param_groups(model, 0.05) for p in group["params"]}
    assert {id(p) for p in model.parameters()} == grouped  # the projector is optimised too

    with pytest.raises(ConfigError, match="data.views: 2"):
        model.training_step((two_view_batch(model)[0][:, 0], torch.zeros(4, dtype=torch.long)), 0)


def test_without_the_contrastive_term_nothing_extra_exists():
    model = ViTClassifier(**TINY)
    assert model.projector is None
    assert all(name.startswith("model.") for name in model.state_dict() if "metrics" not in name
               and "confusion" not in name)


def save_checkpoint(model: ViTClassifier, path: Path) -> Path:
    """The parts of a Lightning checkpoint that init_from reads."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_init_from_loads_the_backbone_and_leaves_the_head_fresh(tmp_path: Path):
    torch.manual_seed(0)
    pretrained = ViTClassifier(**{**TINY, "num_classes": 40})  # e.g. 40 instances
    path = save_checkpoint(pretrained, tmp_path / "pretrain.ckpt")
    torch.manual_seed(1)
    model = ViTClassifier(**TINY, init_from=str(path))
    fresh_head = {k: v.clone() for k, v in model.model.head.state_dict().items()}
    model.load_backbone(path)
    for name, value in model.model.state_dict().items():
        if name.startswith("head."):
            assert torch.equal(value, fresh_head[name.removeprefix("head.")])
        else:
            assert torch.equal(value, pretrained.model.state_dict()[name]), name
    assert model.model.head.weight.shape == (5, 32)

    other = ViTClassifier(**{**TINY, "dim": 48})
    with pytest.raises(ConfigError, match=r"backbone does not fit.*dim=32"):
        other.load_backbone(path)


def test_init_from_another_image_size_resizes_the_position_embeddings(tmp_path: Path):
    # Pre-trained at 16 px (a 4x4 grid of 4 px patches), fine-tuned at 32 px (8x8): every backbone tensor
    # loads, and the position embeddings become the same function of the position on the finer grid.
    torch.manual_seed(0)
    pretrained = ViTClassifier(**{**TINY, "image_size": 16})
    u = torch.linspace(0, 1, 4)  # grid_positions aligns the grids' corners
    smooth = (torch.sin(torch.pi * u)[:, None] + torch.cos(torch.pi * u)[None, :]).reshape(16)  # (16,)
    with torch.no_grad():
        pretrained.model.pos_embed[0, 1:] = smooth[:, None]  # one smooth function in every channel
    path = save_checkpoint(pretrained, tmp_path / "pretrain-16px.ckpt")
    model = ViTClassifier(**{**TINY, "image_size": 32}, init_from=str(path))
    model.load_backbone(path)
    loaded, source = model.model.state_dict(), pretrained.model.state_dict()
    for name, value in loaded.items():
        if name != "pos_embed" and not name.startswith("head."):
            assert torch.equal(value, source[name]), name
    pos = loaded["pos_embed"]
    assert pos.shape == (1, 1 + 64, 32) and torch.equal(pos[0, 0], source["pos_embed"][0, 0])  # the class token
    v = torch.linspace(0, 1, 8)
    exact = (torch.sin(torch.pi * v)[:, None] + torch.cos(torch.pi * v)[None, :]).reshape(64)
    # Bicubic through 4 samples per axis of a half-period sine plus cosine (range 3) stays within 0.11 of
    # them (the cubic kernel's error at that spacing, measured); the grid read transposed would be 2.4 off.
    assert (pos[0, 1:] - exact[:, None]).abs().max() < 0.15
    with pytest.raises(ConfigError, match=r"backbone does not fit.*patch_size"):
        ViTClassifier(**{**TINY, "image_size": 32, "patch_size": 8}).load_backbone(path)

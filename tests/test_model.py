"""The ViT (src/vit_repro/model.py) and its torchvision conversion (convert.py) against torchvision and the paper;
the model registry's cost and summary (models.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TVViT

from vit_repro.core.convert import from_torchvision_state_dict, load_torchvision_weights
from vit_repro.core.model import TABLE1, Block, ViTConfig, VisionTransformer, count_parameters, parse_model_name
from vit_repro.core.config import model_problem
from vit_repro.core.networks import build_model, forward_macs, layer_summary, linear_head

CHECKPOINT = Path("pretrained") / "vit_s14_dinov2_p14_224.safetensors"  # in ../shared
TOL = 1e-5


def _randomise_tv_head(tv: TVViT) -> None:
    """torchvision zero-initialises the head, which would make logit parity trivial."""
    with torch.no_grad():
        for p in tv.heads.parameters():
            p.normal_(std=0.05)


def _converted(tv: TVViT, cfg: ViTConfig) -> VisionTransformer:
    ours = VisionTransformer(cfg)
    assert load_torchvision_weights(ours, tv.state_dict()) == []
    return ours.eval()


@pytest.fixture(scope="module")
def b16_pair() -> tuple[TVViT, VisionTransformer]:
    torch.manual_seed(0)
    tv = torchvision.models.vit_b_16(weights=None, num_classes=3).eval()
    _randomise_tv_head(tv)
    return tv, _converted(tv, parse_model_name("B/16"))


@pytest.fixture(scope="module")
def images224() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------- parameters

def test_b16_parameter_count_matches_torchvision_and_paper() -> None:
    with torch.device("meta"):
        ours = VisionTransformer(parse_model_name("B/16", num_classes=3))
        tv = torchvision.models.vit_b_16(num_classes=3)
    assert count_parameters(ours) == count_parameters(tv) == 85_800_963
    assert count_parameters(ours, trainable_only=True) == 85_800_963


@pytest.mark.parametrize(
    "name, builder",
    [
        ("L/16", torchvision.models.vit_l_16),
        ("H/14", torchvision.models.vit_h_14),
        ("B/32", torchvision.models.vit_b_32),
    ],
)
def test_parameter_count_matches_torchvision(name: str, builder) -> None:
    with torch.device("meta"):
        ours = VisionTransformer(parse_model_name(name))
        tv = builder(num_classes=3)
    assert count_parameters(ours) == count_parameters(tv)
    # the keys map one-to-one, shapes included
    theirs = {k: tuple(v.shape) for k, v in from_torchvision_state_dict(tv.state_dict()).items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


def test_ti16_parameter_count() -> None:
    with torch.device("meta"):
        ours = VisionTransformer(parse_model_name("Ti/16"))
    assert count_parameters(ours) == 5_524_995  # the count docs/run-outputs.md quotes


def test_trainable_only_counts_unfrozen() -> None:
    model = VisionTransformer(parse_model_name("Ti/8", image_size=32))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.heads.parameters():
        p.requires_grad_(True)
    assert count_parameters(model, trainable_only=True) == 192 * 3 + 3


# -------------------------------------------------------------------------------------------- parity

def test_b16_parity_with_torchvision(b16_pair, images224) -> None:
    tv, ours = b16_pair
    with torch.no_grad():
        expected = tv(images224)
        got = ours(images224)
    assert expected.abs().max() > 0.1  # a real comparison, not zeros against zeros
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("representation_size, dropout", [(None, 0.0), (None, 0.1), (64, 0.0)])
def test_small_variant_parity_with_torchvision(representation_size, dropout) -> None:
    torch.manual_seed(2)
    tv = TVViT(
        image_size=32, patch_size=8, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768,
        num_classes=3, dropout=dropout, representation_size=representation_size,
    ).eval()
    _randomise_tv_head(tv)
    cfg = parse_model_name("Ti/8", image_size=32, dropout=dropout, representation_size=representation_size)
    ours = _converted(tv, cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = tv(x), ours(x)
    assert expected.abs().max() > 0.01
    assert (got - expected).abs().max().item() < TOL


def test_conversion_renames_every_tensor_without_copying(b16_pair) -> None:
    tv, ours = b16_pair
    converted = from_torchvision_state_dict(tv.state_dict(), ours.cfg)
    assert converted.keys() == ours.state_dict().keys()
    assert {t.data_ptr() for t in converted.values()} == {t.data_ptr() for t in tv.state_dict().values()}


def test_representation_head_loads_from_torchvision() -> None:
    cfg = parse_model_name("Ti/8", image_size=32, representation_size=16)
    ours = VisionTransformer(cfg).eval()
    assert isinstance(ours.heads.act, nn.Tanh)
    tv = TVViT(32, 8, 12, 3, 192, 768, num_classes=3, representation_size=16).eval()
    load_torchvision_weights(ours, tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- loader

def test_loader_rejects_wrong_architecture() -> None:
    tv = TVViT(32, 8, 2, 3, 192, 768, num_classes=3)  # 2 layers
    with pytest.raises(ValueError, match="missing keys") as err:
        load_torchvision_weights(VisionTransformer(parse_model_name("Ti/8", image_size=32)), tv.state_dict())
    assert "encoder_layer_2" in str(err.value)
    with pytest.raises(ValueError, match="mis-shaped keys"):
        load_torchvision_weights(VisionTransformer(ViTConfig(32, 8, 2, 4, 256, 768)), tv.state_dict())
    with pytest.raises(ValueError, match="encoder.pos_embedding.*tokens"):
        load_torchvision_weights(VisionTransformer(ViTConfig(64, 8, 2, 3, 192, 768)), tv.state_dict())
    small = VisionTransformer(ViTConfig(32, 8, 1, 3, 192, 768))
    with pytest.raises(ValueError, match="(?s)unexpected keys.*encoder_layer_1"):
        load_torchvision_weights(small, tv.state_dict())
    junk = dict(tv.state_dict(), **{"encoder.something_else": torch.zeros(1)})
    with pytest.raises(ValueError, match="(?s)unexpected keys.*something_else"):
        load_torchvision_weights(VisionTransformer(ViTConfig(32, 8, 2, 3, 192, 768)), junk)
    with pytest.raises(ValueError, match="something_else"):
        from_torchvision_state_dict(junk)
    with pytest.raises(ValueError, match="does not match the config"):
        from_torchvision_state_dict(tv.state_dict(), ViTConfig(32, 8, 3, 3, 192, 768))


def test_loader_skips_other_heads_and_reports_them() -> None:
    tv = TVViT(32, 8, 2, 3, 192, 768, num_classes=1000, representation_size=32)  # an ImageNet-style head
    ours = VisionTransformer(ViTConfig(32, 8, 2, 3, 192, 768, num_classes=3))
    missing = load_torchvision_weights(ours, tv.state_dict())
    assert sorted(missing) == ["heads.head.bias", "heads.head.weight"]
    assert torch.equal(ours.cls_token, tv.class_token)
    headless = {k: v for k, v in tv.state_dict().items() if not k.startswith("heads.")}
    assert sorted(load_torchvision_weights(ours, headless)) == ["heads.head.bias", "heads.head.weight"]


def test_shared_pretrained_checkpoint(shared_dir: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(shared_dir / CHECKPOINT)
    ours = VisionTransformer(parse_model_name("S/14")).eval()
    assert sorted(load_torchvision_weights(ours, sd)) == ["heads.head.bias", "heads.head.weight"]

    tv = TVViT(image_size=224, patch_size=14, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536).eval()
    tv.load_state_dict({k: v for k, v in sd.items() if not k.startswith("heads.")}, strict=False)
    tv.heads = nn.Identity()  # torchvision then returns the class token after encoder.ln
    assert not set(tv.state_dict()) ^ set(sd)  # the file is exactly the torchvision backbone

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats, expected = ours.forward_features(x), tv(x)
        logits = ours(x)
    assert feats.shape == (2, 384) and logits.shape == (2, 3)
    assert torch.isfinite(feats).all()
    # measured max |diff| ~5e-6 on features up to ~9 in magnitude (a few float32 ulps); rtol covers
    # other CPUs' summation orders
    torch.testing.assert_close(feats, expected, atol=TOL, rtol=1e-6)


# ----------------------------------------------------------------------------------- shapes & config

def test_b16_shapes_at_every_stage(b16_pair, images224) -> None:
    _, ours = b16_pair
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [
        ours.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("patches", tuple(o.shape))),
        ours.blocks.register_forward_hook(lambda m, i, o: seen.__setitem__("encoder", tuple(o.shape))),
    ]
    try:
        with torch.no_grad():
            z0 = ours.embed(images224)
            logits = ours(images224)
    finally:
        for h in hooks:
            h.remove()
    assert images224.shape == (2, 3, 224, 224)
    assert seen["patches"] == (2, 196, 768)
    assert z0.shape == (2, 197, 768)
    assert seen["encoder"] == (2, 197, 768)
    assert logits.shape == (2, 3)
    cfg = ours.cfg
    assert (cfg.num_patches, cfg.seq_len) == (196, 197)


def test_forward_tokens_and_features_agree() -> None:
    model = VisionTransformer(parse_model_name("Ti/8", image_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, feats = model.forward_tokens(x), model.forward_features(x)
    assert tokens.shape == (2, 17, 192)
    torch.testing.assert_close(tokens[:, 0], feats)
    with pytest.raises(ValueError, match="expected 32x32"):
        model(torch.randn(1, 3, 48, 48))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="image size 225 is not divisible by patch size 16"):
        ViTConfig(image_size=225)
    with pytest.raises(ValueError, match="not divisible by patch size 16"):
        parse_model_name("B/16", image_size=225)
    with pytest.raises(ValueError, match="hidden dim 100 is not divisible"):
        ViTConfig(hidden_dim=100, num_heads=12)
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        ViTConfig(num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        ViTConfig(dropout=1.5)
    for bad in ("X/16", "G/14", "B16", "B/", "", "B/16/2"):
        with pytest.raises(ValueError, match=r"Ti/<patch>, S/<patch>, B/<patch>, L/<patch>, H/<patch>"):
            parse_model_name(bad)
    with pytest.raises(ValueError, match="num_heads cannot be overridden"):
        parse_model_name("B/16", num_heads=24)
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        parse_model_name("B/16", n_classes=3)


def test_parse_model_name() -> None:
    cfg = parse_model_name("ViT-B/16")
    assert cfg == parse_model_name("B/16") == ViTConfig()
    assert parse_model_name("S/14").patch_size == 14
    cfg = parse_model_name("L/32", image_size=384, num_classes=10, dropout=0.1)
    assert (cfg.num_layers, cfg.hidden_dim, cfg.mlp_dim, cfg.num_heads) == (24, 1024, 4096, 16)
    assert (cfg.image_size, cfg.patch_size, cfg.num_classes, cfg.dropout) == (384, 32, 10, 0.1)
    assert TABLE1["Ti"] == dict(num_layers=12, hidden_dim=192, mlp_dim=768, num_heads=3)
    assert TABLE1["H"] == dict(num_layers=32, hidden_dim=1280, mlp_dim=5120, num_heads=16)


def test_heads_come_from_the_variant_not_the_depth(b16_pair) -> None:
    _, b16 = b16_pair
    assert len(b16.blocks) == 12
    assert {blk.attn.num_heads for blk in b16.blocks} == {12}
    assert {blk.attn.head_dim for blk in b16.blocks} == {64}
    with torch.device("meta"):
        l16 = VisionTransformer(parse_model_name("L/16"))
    assert len(l16.blocks) == 24
    assert {blk.attn.num_heads for blk in l16.blocks} == {16}  # not num_layers = 24
    with pytest.raises(TypeError):
        Block(768, 12, 3072)  # keyword-only: sizes cannot be passed in the wrong order


# ---------------------------------------------------------------------------------------------- init

def test_init_facts() -> None:
    torch.manual_seed(4)
    model = VisionTransformer(parse_model_name("B/16"))
    assert torch.count_nonzero(model.cls_token) == 0
    assert model.pos_embed.shape == (1, 197, 768)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.001
    assert abs(model.pos_embed.mean().item()) < 0.001
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    blk = model.blocks[0]
    assert blk.attn.qkv.weight.abs().max() <= math.sqrt(6 / (2 * 768))  # Xavier per q/k/v (D x D)
    assert blk.mlp.fc1.weight.abs().max() <= math.sqrt(6 / (768 + 3072))
    assert torch.count_nonzero(blk.mlp.fc1.bias) == 0
    assert torch.equal(blk.norm1.weight, torch.ones(768)) and torch.count_nonzero(blk.norm1.bias) == 0
    conv = model.patch_embed.proj.weight
    # torch's trunc_normal_ cuts at +-2 absolute (as in torchvision), far beyond this std
    assert abs(conv.std().item() - math.sqrt(1 / (3 * 16 * 16))) < 0.001
    assert model.norm.eps == 1e-6 and blk.norm1.eps == 1e-6
    # dropout off means no dropout modules at all
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_reset_head_zero_inits() -> None:
    model = VisionTransformer(parse_model_name("Ti/8", image_size=32, num_classes=7, representation_size=16))
    model.reset_head(5)
    assert list(model.heads._modules) == ["head"]  # pre-logits layer removed, as in the paper
    assert model.head.weight.shape == (5, 192)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.cfg.num_classes == 5 and model.cfg.representation_size is None
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert torch.equal(out, torch.zeros(2, 5))
    model.reset_head(4, zero_init=False)
    assert torch.count_nonzero(model.head.weight) > 0


# ------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("field", ["dropout", "attention_dropout"])
def test_dropout_only_in_training(field: str) -> None:
    torch.manual_seed(5)
    model = VisionTransformer(parse_model_name("Ti/8", image_size=32, **{field: 0.1}))
    nn.init.normal_(model.head.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        model.eval()
        assert torch.equal(model(x), model(x))


def test_dropout_placement() -> None:
    model = VisionTransformer(parse_model_name("Ti/8", image_size=32, dropout=0.1))
    drops = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
    # after the position embedding, after attention's output projection, after each MLP dense layer
    assert drops[:4] == ["pos_drop", "blocks.0.attn.proj_drop", "blocks.0.mlp.drop1", "blocks.0.mlp.drop2"]
    assert len(drops) == 1 + 3 * 12


# ---------------------------------------------------------------------------------- summary and cost

def test_layer_summary(b16_pair) -> None:
    _, ours = b16_pair
    text = layer_summary(ours, 224)
    assert "85,800,963" in text
    assert "PatchEmbed" in text and "Block" in text and "Attention" in text
    assert "[1, 196, 768]" in text and "[1, 197, 768]" in text
    assert "mult-adds" not in text.lower()  # torchinfo's count misses attention; forward_macs is the one we quote


def _analytic_macs(cfg: ViTConfig) -> int:
    """Per image: patch embedding N·3P²·D; per block qkv 3TD², scores and weighted sum 2T²D, output projection TD²,
    MLP 2TDM; the head on the class token (T = N + 1 tokens, width D, MLP width M, patch side P)."""
    t, d = cfg.seq_len, cfg.hidden_dim
    block = 3 * t * d * d + 2 * t * t * d + t * d * d + 2 * t * d * cfg.mlp_dim
    return cfg.num_patches * cfg.in_channels * cfg.patch_size**2 * d + cfg.num_layers * block + d * cfg.num_classes


@pytest.mark.parametrize("name, image_size", [("vit:B/16", 224), ("vit:S/14", 224), ("vit:Ti/16", 32), ("vit:L/32", 384)])
def test_forward_macs_counts_every_matmul_of_the_vit(name: str, image_size: int) -> None:
    model = build_model(name, image_size, 3, device="meta")
    assert forward_macs(model, image_size) == _analytic_macs(model.cfg)


def test_forward_macs_match_torchvisions_published_figures() -> None:
    from torchvision.models import ResNet18_Weights, ViT_B_16_Weights

    for name, weights in (("vit:B/16", ViT_B_16_Weights.IMAGENET1K_V1), ("resnet18", ResNet18_Weights.IMAGENET1K_V1)):
        macs = forward_macs(build_model(name, 224, 1000, device="meta"), 224)
        assert round(macs / 1e9, 3) == weights.meta["_ops"], name  # 17.564 and 1.814 GMACs ("GFLOPS" in their docs)


def test_build_model_by_name() -> None:
    torch.manual_seed(0)
    vit = build_model("vit:Ti/16", 32, 3, dropout=0.1)
    assert isinstance(vit, VisionTransformer) and vit.cfg == parse_model_name("Ti/16", image_size=32, num_classes=3,
                                                                                dropout=0.1)
    torch.manual_seed(0)
    same = VisionTransformer(parse_model_name("Ti/16", image_size=32, num_classes=3, dropout=0.1))
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), same.state_dict().values()))
    assert count_parameters(build_model("resnet18", 224, 3, device="meta")) == 11_178_051
    for bad in ("Ti/16", "vit:X/16", "resnet50", "vit:"):
        assert model_problem(bad)
        with pytest.raises(ValueError):
            build_model(bad, 32, 3)
    assert "not divisible" in model_problem("vit:Ti/16", 60) and model_problem("vit:Ti/16", 64) == ""
    head = linear_head(384, 3)
    assert head.weight.shape == (3, 384) and not head.weight.any() and not head.bias.any()


# ---------------------------------------------------------------------------------------- attention kernels

def _kernel_pair(dropout: float = 0.0) -> tuple[VisionTransformer, VisionTransformer]:
    cfg = ViTConfig(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96,
                    attention_dropout=dropout)
    torch.manual_seed(0)
    sdpa = VisionTransformer(cfg, attention="sdpa")
    matmul = VisionTransformer(cfg, attention="matmul")
    matmul.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        for p in (*sdpa.heads.parameters(), *matmul.heads.parameters()):
            p.fill_(0.1)
    return sdpa, matmul


def test_attention_kernels_compute_the_same_function() -> None:
    sdpa, matmul = _kernel_pair()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(matmul(x), sdpa(x), rtol=0, atol=1e-5)  # float32: rounding only
    # gradients agree too (training mode, no dropout)
    for model in (sdpa, matmul):
        model.train().zero_grad()
        model(x).square().sum().backward()
    for (name, a), b in zip(sdpa.named_parameters(), matmul.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    # under bfloat16 autocast both stay within bfloat16 rounding of the float32 result
    with torch.no_grad():
        ref = sdpa.eval().forward_features(x)
        for model in (sdpa, matmul):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.eval().forward_features(x).float()
            assert (out - ref).abs().max() < 0.1
            assert (out - ref).abs().mean() < 0.02


def test_auto_attention_kernel_choice() -> None:
    from vit_repro.core.model import attention_kernel

    q32, q16 = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16)
    assert attention_kernel("auto", q32) == "sdpa"
    assert attention_kernel("auto", q16) == "matmul"  # measured faster on the CPU
    assert attention_kernel("auto", q16.half()) == "matmul"
    assert attention_kernel("sdpa", q16) == "sdpa" and attention_kernel("matmul", q32) == "matmul"
    with torch.device("meta"):
        assert attention_kernel("auto", torch.empty(1, dtype=torch.bfloat16)) == "sdpa"  # not the CPU
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, matmul"):
        VisionTransformer(ViTConfig(image_size=32, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8),
                          attention="flash")


def test_matmul_attention_applies_attention_dropout_in_training_only() -> None:
    _, matmul = _kernel_pair(dropout=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    matmul.eval()
    assert torch.equal(matmul(x), matmul(x))
    matmul.train()
    torch.manual_seed(0)
    a = matmul(x)
    torch.manual_seed(1)
    assert not torch.equal(a, matmul(x))

"""The Vision Transformer of Dosovitskiy et al. (arXiv:2010.11929), equations 1-4.

Layout follows timm's ``vision_transformer.py``: a patch-embedding module, a stack of pre-LayerNorm
encoder ``Block``s, a final LayerNorm and a head; optional features are ``nn.Identity`` when off.

    z_0   = [x_class; x_p^1 E; ...; x_p^N E] + E_pos            (eq. 1)  -> ``embed``
    z'_l  = MSA(LN(z_{l-1})) + z_{l-1}                          (eq. 2)  -> ``Block``
    z_l   = MLP(LN(z'_l)) + z'_l                                (eq. 3)  -> ``Block``
    y     = LN(z_L^0)                                           (eq. 4)  -> ``forward_features``

Initialisation (see ``VisionTransformer._init_weights``) follows the official JAX code
(google-research/vision_transformer) and torchvision where they agree:

* every Linear layer of the encoder: Xavier-uniform weights, zero biases. The fused qkv projection is
  initialised as three separate D x D matrices, as the official code's separate query/key/value
  layers are (torchvision applies Xavier to the fused 3D x D matrix, which gives a smaller bound);
* patch-embedding convolution: LeCun / fan-in truncated normal (std sqrt(1 / fan_in)), zero bias,
  as torchvision (``trunc_normal_``'s bounds are +-2 absolute, so for this std it is nearly normal);
* class token zeros; position embedding normal(std 0.02), as torchvision and the official code;
* LayerNorm weight ones, bias zeros (eps 1e-6);
* classifier head zeros (the paper's fine-tuning head); the optional pre-logits layer fan-in
  truncated normal, as torchvision.

GELU is the exact (erf) form, as in torchvision; the official JAX code uses the tanh approximation.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import paper
from .config import split_vit_name

__all__ = [
    "TABLE1",
    "ViTConfig",
    "parse_model_name",
    "PatchEmbed",
    "ATTENTION_KERNELS",
    "attention_kernel",
    "Attention",
    "Mlp",
    "Block",
    "VisionTransformer",
    "count_parameters",
]

# Model variants: the encoder sizes of paper.TABLE1 (B/L/H from the paper, Ti/S from the official code).
TABLE1: dict[str, dict[str, int]] = {
    key: dict(num_layers=v.layers, hidden_dim=v.hidden, mlp_dim=v.mlp, num_heads=v.heads) for key, v in paper.TABLE1.items()
}


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one Vision Transformer.

    Attributes:
        image_size: side of the square input image in pixels.
        patch_size: side of the square patches (the "/16" of "B/16").
        num_layers: number of encoder blocks L.
        num_heads: attention heads per block (Table 1; never the number of layers).
        hidden_dim: token width D.
        mlp_dim: hidden width of each block's MLP.
        num_classes: outputs of the classifier head.
        dropout: dropout rate after the position-embedding add and after every dense layer except the
            qkv projection (paper Sec. 4.1 / App. B.1); 0 disables it (modules become ``nn.Identity``).
        attention_dropout: dropout on the attention weights (SDPA ``dropout_p``); 0 in the paper.
        representation_size: width of the paper's pre-training head hidden layer (Linear -> tanh);
            ``None`` gives a single linear head, as used for fine-tuning.
        ln_eps: LayerNorm epsilon.
        in_channels: input image channels.
    """

    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    num_classes: int = 3
    dropout: float = 0.0
    attention_dropout: float = 0.0
    representation_size: int | None = None
    ln_eps: float = 1e-6
    in_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim",
                     "num_classes", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        rep = self.representation_size
        if rep is not None and (isinstance(rep, bool) or not isinstance(rep, int) or rep <= 0):
            raise ValueError(f"representation_size must be a positive integer or None, got {rep!r}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps must be positive, got {self.ln_eps!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}"
            )
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"hidden dim {self.hidden_dim} is not divisible by the number of heads {self.num_heads}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Number of patches N = (image_size / patch_size)^2."""
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Encoder sequence length: the patches plus the class token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_dim // self.num_heads


# Fields a model name fixes; build a ViTConfig directly for anything else.
_FIXED_BY_NAME = ("patch_size", "image_size", *TABLE1["B"])


def parse_model_name(name: str, image_size: int = 224, **overrides) -> ViTConfig:
    """Config for a named variant, e.g. ``"B/16"``, ``"Ti/16"``, ``"S/14"``, ``"ViT-L/32"`` (``config.split_vit_name``).

    ``overrides`` sets the remaining ``ViTConfig`` fields (``num_classes``, ``dropout``, ...). The
    architecture fields and the patch size come from the name only.
    """
    variant, patch = split_vit_name(name)  # the image size is checked by ViTConfig
    fixed = sorted(set(overrides) & set(_FIXED_BY_NAME))
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)} cannot be overridden: fixed by the model name {name!r} / image_size; "
            "build a ViTConfig directly for a custom architecture"
        )
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)})
    if unknown:
        raise ValueError(f"unknown ViTConfig field(s): {', '.join(unknown)}")
    return ViTConfig(image_size=image_size, patch_size=patch, **TABLE1[variant], **overrides)


def _dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` when ``p == 0`` (no work at all)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Split the image into patches and project each to D: a strided convolution (eq. 1's x_p E)."""

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, hidden_dim: int) -> None:
        """
        Args:
            image_size: expected input height and width.
            patch_size: patch side; also the convolution's kernel size and stride.
            in_channels: input channels.
            hidden_dim: output token width D.
        """
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


ATTENTION_KERNELS = ("auto", "sdpa", "matmul")


def attention_kernel(choice: str, q: Tensor) -> str:
    """The kernel ``choice`` runs for queries ``q``: ``auto`` is ``matmul`` for bfloat16/float16 on the CPU, else ``sdpa``.

    On the CPU, PyTorch's fused SDPA kernel is slower than plain batched matmuls for reduced-precision
    inputs (ViT-B/16 training step, batch 32, bf16 autocast, 2-core CPU: 11.6 s with SDPA, 9.9 s with
    matmuls; ``vit-repro bench`` measures it). It is the faster one in float32 and on GPUs.
    """
    if choice != "auto":
        return choice
    reduced = q.dtype in (torch.bfloat16, torch.float16)
    return "matmul" if reduced and q.device.type == "cpu" else "sdpa"


class Attention(nn.Module):
    """Multi-head self-attention (MSA) with a fused qkv projection and an output projection."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        attention: str = "auto",
    ) -> None:
        """
        Args:
            dim: token width D; must be divisible by ``num_heads``.
            num_heads: number of attention heads.
            attention_dropout: dropout on the attention weights (training only).
            dropout: dropout after the output projection.
            attention: kernel for softmax(q k^T / sqrt(d)) v, the same function either way:
                ``"sdpa"`` (fused ``F.scaled_dot_product_attention``), ``"matmul"`` (two batched
                matmuls and a softmax) or ``"auto"`` (see ``attention_kernel``).
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden dim {dim} is not divisible by the number of heads {num_heads}")
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {attention!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_dropout = attention_dropout
        self.attention = attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        # One reshape to (3, B, heads, N, head_dim); q/k/v are views of it.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attention_dropout if self.training else 0.0
        if attention_kernel(self.attention, q) == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            weights = F.dropout(((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1), p)
            x = weights @ v
        x = x.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """The block's MLP: Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, *, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        """
        Args:
            dim: input and output width D.
            mlp_dim: hidden width.
            dropout: dropout after each of the two dense layers.
        """
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.drop1 = _dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop2 = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """One pre-LayerNorm encoder block: eq. 2 (MSA + residual) then eq. 3 (MLP + residual).

    All arguments are keyword-only, so the number of heads cannot be confused with another size.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        ln_eps: float = 1e-6,
        attention: str = "auto",
    ) -> None:
        """
        Args:
            dim: token width D.
            num_heads: attention heads.
            mlp_dim: MLP hidden width.
            dropout: dropout after the attention output projection and the MLP's dense layers.
            attention_dropout: dropout on the attention weights.
            ln_eps: LayerNorm epsilon.
            attention: attention kernel, see ``Attention``.
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(
            dim=dim, num_heads=num_heads, attention_dropout=attention_dropout, dropout=dropout, attention=attention
        )
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim=dim, mlp_dim=mlp_dim, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _make_heads(cfg: ViTConfig) -> nn.Sequential:
    """Classifier head with torchvision's names: ``head``, or ``pre_logits`` -> ``act`` -> ``head``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = cfg.hidden_dim
    if cfg.representation_size is not None:
        layers["pre_logits"] = nn.Linear(cfg.hidden_dim, cfg.representation_size)
        layers["act"] = nn.Tanh()
        width = cfg.representation_size
    layers["head"] = nn.Linear(width, cfg.num_classes)
    return nn.Sequential(layers)


class VisionTransformer(nn.Module):
    """ViT (eqs. 1-4). All sizes come from ``cfg``; see the module docstring for the initialisation.

    Submodules: ``patch_embed``, ``cls_token`` [1, 1, D], ``pos_embed`` [1, N+1, D], ``pos_drop``,
    ``blocks`` (``nn.Sequential`` of ``Block``), ``norm`` (final LayerNorm), ``heads``.
    """

    def __init__(self, cfg: ViTConfig, attention: str = "auto") -> None:
        """
        Args:
            cfg: the architecture; see ``ViTConfig`` and ``parse_model_name``.
            attention: attention kernel of every block (``auto``, ``sdpa`` or ``matmul``); an
                implementation choice, not part of the architecture: see ``attention_kernel``.
        """
        super().__init__()
        if not isinstance(cfg, ViTConfig):
            raise TypeError(f"cfg must be a ViTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d = cfg.hidden_dim
        self.patch_embed = PatchEmbed(
            image_size=cfg.image_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_dim=d
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, d))
        self.pos_drop = _dropout(cfg.dropout)
        self.blocks = nn.Sequential(
            *(
                Block(
                    dim=cfg.hidden_dim,
                    num_heads=cfg.num_heads,
                    mlp_dim=cfg.mlp_dim,
                    dropout=cfg.dropout,
                    attention_dropout=cfg.attention_dropout,
                    ln_eps=cfg.ln_eps,
                    attention=attention,
                )
                for _ in range(cfg.num_layers)
            )
        )
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.heads = _make_heads(cfg)
        self._init_weights()

    @property
    def head(self) -> nn.Linear:
        """The final classifier layer (``heads.head``)."""
        return self.heads.head

    @torch.no_grad()
    def _init_weights(self) -> None:
        d = self.cfg.hidden_dim
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # q, k and v as three D x D layers, as in the official code
            for part in block.attn.qkv.weight.split(d, dim=0):
                nn.init.xavier_uniform_(part)
        conv = self.patch_embed.proj
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.cls_token)
        nn.init.normal_(self.pos_embed, std=0.02)
        if "pre_logits" in self.heads._modules:
            pre = self.heads.pre_logits
            nn.init.trunc_normal_(pre.weight, std=math.sqrt(1.0 / pre.in_features))
            nn.init.zeros_(pre.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def embed(self, x: Tensor) -> Tensor:
        """Eq. 1: images (B, C, H, W) -> z_0 (B, N+1, D): class token, patches, + E_pos, dropout."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """All encoder output tokens after the final LayerNorm: (B, N+1, D)."""
        return self.norm(self.blocks(self.embed(x)))

    def forward_features(self, x: Tensor) -> Tensor:
        """Eq. 4's y: the class token after the final LayerNorm, (B, D)."""
        z = self.blocks(self.embed(x))
        return self.norm(z[:, 0])  # LayerNorm is per token: normalise only the class token

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes)."""
        return self.heads(self.forward_features(x))

    def reset_head(self, num_classes: int, zero_init: bool = True) -> None:
        """Replace the whole head by one linear layer (the paper's fine-tuning head, App. B.1.1).

        Args:
            num_classes: outputs of the new head.
            zero_init: zero weight and bias as in the paper; otherwise Xavier-uniform weight, zero bias.
        """
        ref = self.norm.weight
        head = nn.Linear(self.cfg.hidden_dim, num_classes, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if zero_init:
                nn.init.zeros_(head.weight)
            else:
                nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        self.heads = nn.Sequential(OrderedDict(head=head))
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes, representation_size=None)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); only those with ``requires_grad`` if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

"""Vision Transformer face backbones (arcface_torch `vit_t/s/b/l/h`) with the official parameter names.

Structure, names, shapes, initialisation and forward order follow arcface_torch `backbones/vit.py`
and `get_model`: 9x9 patches on 112x112 (a 12x12 grid, 144 tokens; the last 4 pixel rows and
columns are never seen), a learned position embedding and no class token, pre-norm blocks
(LayerNorm, 8-head attention with a bias-free qkv, a ReLU6 MLP of 4x width, stochastic depth), a
final LayerNorm, and the feature head Linear(144 x width -> width), BN, Linear(width -> embedding),
BN (eps 2e-5). In training a random `mask_ratio` of the tokens per sample is dropped before the
blocks and replaced by `mask_token` after the final LayerNorm. An official state dict loads with
`strict=True` and gives the official embeddings.

Deliberate differences from the official file:
- No autocast inside the model (the official forces fp16 autocast around qkv, proj and the MLP and
  float32 for attention): precision belongs to the Trainer. Attention is
  `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on a GPU),
  equal to the official softmax(QK^T / sqrt(d)) V; `fused_attention=False` runs the explicit formula.
- `mask_ratio` is the ratio masked. The official `forward_features` calls `random_masking(x)` with
  its default 0.1 whatever `mask_ratio` is, so its `vit_b_dp005_mask_005` masks 10%, not 5%
  (pass `mask_ratio=0.1` for that); a ratio of 0 disables masking in both.
- The masking noise comes from the global torch generator of the input's device, as the official
  `torch.rand(..., device=x.device)`: seeded by `torch.manual_seed` / Lightning's `seed_everything`
  and saved in femb checkpoints, so a resumed run masks as an uninterrupted one.
- Gradient checkpointing is the constructor argument `gradient_checkpointing` (off by default for
  every size; arcface_torch turns it on for vit_b/l/h), applied per block as for IResNet.
- Without masking `mask_token` does not require grad (it is unused, so DDP finds no unused parameter).

channels_last does not apply (one patch convolution). The ONNX exporter (opset 18) writes the fused
attention as MatMul / Softmax; no switch is needed for export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

PATCH_SIZE = 9
IMAGE_SIZE = 112
NUM_HEADS = 8
MLP_RATIO = 4.0
FEATURE_BN_EPS = 2e-5  # the feature head's BatchNorms; the LayerNorms keep PyTorch's 1e-5
INIT_STD = 0.02

# Width and depth of each size, from arcface_torch `get_model`.
VIT_LAYOUTS: dict[str, tuple[int, int]] = {
    "vit_t": (256, 12),
    "vit_s": (512, 12),
    "vit_b": (512, 24),
    "vit_l": (768, 24),
    "vit_h": (1024, 48),
}
MICRO_LAYOUT = (64, 4)  # vit_micro: a CPU-sized demo ViT, not an official size
MICRO_HEADS = 4


class Mlp(nn.Module):
    """fc1 -> ReLU6 -> dropout -> fc2 -> dropout (arcface_torch `Mlp`)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def explicit_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V written out, as the official `Attention.forward` computes it."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias, per-head scaled dot product, output projection."""

    def __init__(self, dim: int, num_heads: int = NUM_HEADS, dropout: float = 0.0, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # (3, B, heads, L, head_dim), the official split of the qkv output
        qkv = (
            self.qkv(x)
            .reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v) if self.fused else explicit_attention(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016) per sample, kept paths scaled by 1/keep, as timm's DropPath."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = MLP_RATIO,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        fused_attention: bool = True,
    ):
        super().__init__()
        # Registration order is the official one (norm1, norm2, attn, mlp): it fixes the state_dict order.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout, fused_attention)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping `patch_size` convolution: N x 3 x H x W -> N x tokens x width."""

    def __init__(self, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, dim: int = 768):
        super().__init__()
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"input of {x.shape[-2]}x{x.shape[-1]} pixels, the model takes {self.image_size}x{self.image_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT face backbone: 112x112 RGB in, `num_features`-d embedding out (arcface_torch `VisionTransformer`)."""

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_features: int = 512,
        num_heads: int = NUM_HEADS,
        mlp_ratio: float = MLP_RATIO,
        patch_size: int = PATCH_SIZE,
        image_size: int = IMAGE_SIZE,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        fused_attention: bool = True,
    ):
        super().__init__()
        if embed_dim < 1 or depth < 1 or num_features < 1:
            raise ValueError(
                f"embed_dim, depth and num_features must be positive, got {embed_dim}, {depth}, {num_features}"
            )
        for name, value in (
            ("dropout", dropout),
            ("drop_path_rate", drop_path_rate),
            ("mask_ratio", mask_ratio),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.gradient_checkpointing = gradient_checkpointing

        self.patch_embed = PatchEmbed(image_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        # Own parameters come first in the state dict, in this order (as the official pos_embed, mask_token).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Unused without masking: then it takes no gradient, so DDP needs no search for unused parameters.
        self.mask_token.requires_grad_(mask_ratio > 0)
        self.pos_drop = nn.Dropout(dropout)
        # The stochastic depth decay rule: 0 at the first block up to drop_path_rate at the last.
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, dropout, rate, fused_attention) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=FEATURE_BN_EPS),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=FEATURE_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # The official distributions: N(0, 0.02) mask token, truncated N(0, 0.02) position embedding and
        # Linear weights, zero biases, unit LayerNorms; the patch conv and BatchNorms keep PyTorch's init.
        nn.init.normal_(self.mask_token, std=INIT_STD)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)  # bounds +-2 absolute, as timm's
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay (timm's convention): the position embedding and mask token."""
        return {"pos_embed", "mask_token"}

    def random_masking(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Keep `int(L * (1 - mask_ratio))` random tokens per sample: (kept tokens, indices that restore order).

        As the official (MAE's per-sample shuffle): uniform noise per token on the input's device, argsort,
        the lowest-noise tokens kept in noise order. The noise comes from `generator` (on x's device) or
        the global generator.
        """
        batch, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(batch, length, device=x.device, generator=generator)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, dim))
        return kept, restore

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens after the final LayerNorm, masked positions holding `mask_token`, flattened: N x (L * width)."""
        batch = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self.random_masking(x)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        x = self.norm(x)
        if masking:
            fill = self.mask_token.to(x.dtype).expand(batch, self.num_patches - x.shape[1], -1)
            x = torch.gather(torch.cat([x, fill], dim=1), 1, restore[..., None].expand(-1, -1, x.shape[2]))
        return x.reshape(batch, self.num_patches * self.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.feature(self.forward_features(x))


def _vit(
    name: str,
    num_features: int,
    dropout: float,
    drop_path_rate: float,
    mask_ratio: float,
    gradient_checkpointing: bool,
    fused_attention: bool,
) -> VisionTransformer:
    width, depth = VIT_LAYOUTS[name]
    return VisionTransformer(
        width,
        depth,
        num_features,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
        mask_ratio=mask_ratio,
        gradient_checkpointing=gradient_checkpointing,
        fused_attention=fused_attention,
    )


def vit_t(
    num_features: int = 512,
    dropout: float = 0.0,
    drop_path_rate: float = 0.1,
    mask_ratio: float = 0.1,
    gradient_checkpointing: bool = False,
    fused_attention: bool = True,
) -> VisionTransformer:
    """ViT-T: width 256, depth 12 (arcface_torch `vit_t`; WebFace42M `vit_t_dp005_mask0`: 0.05, 0.0)."""
    return _vit(
        "vit_t", num_features, dropout, drop_path_rate, mask_ratio, gradient_checkpointing, fused_attention
    )


def vit_s(
    num_features: int = 512,
    dropout: float = 0.0,
    drop_path_rate: float = 0.1,
    mask_ratio: float = 0.1,
    gradient_checkpointing: bool = False,
    fused_attention: bool = True,
) -> VisionTransformer:
    """ViT-S: width 512, depth 12 (arcface_torch `vit_s`; WebFace42M `vit_s_dp005_mask_0`: 0.05, 0.0)."""
    return _vit(
        "vit_s", num_features, dropout, drop_path_rate, mask_ratio, gradient_checkpointing, fused_attention
    )


def vit_b(
    num_features: int = 512,
    dropout: float = 0.0,
    drop_path_rate: float = 0.1,
    mask_ratio: float = 0.1,
    gradient_checkpointing: bool = False,
    fused_attention: bool = True,
) -> VisionTransformer:
    """ViT-B: width 512, depth 24 (arcface_torch `vit_b`; WebFace42M `vit_b_dp005_mask_005`: 0.05, 0.05)."""
    return _vit(
        "vit_b", num_features, dropout, drop_path_rate, mask_ratio, gradient_checkpointing, fused_attention
    )


def vit_l(
    num_features: int = 512,
    dropout: float = 0.0,
    drop_path_rate: float = 0.05,
    mask_ratio: float = 0.05,
    gradient_checkpointing: bool = False,
    fused_attention: bool = True,
) -> VisionTransformer:
    """ViT-L: width 768, depth 24 (arcface_torch has only the WebFace42M `vit_l_dp005_mask_005`)."""
    return _vit(
        "vit_l", num_features, dropout, drop_path_rate, mask_ratio, gradient_checkpointing, fused_attention
    )


def vit_h(
    num_features: int = 512,
    dropout: float = 0.0,
    drop_path_rate: float = 0.1,
    mask_ratio: float = 0.0,
    gradient_checkpointing: bool = False,
    fused_attention: bool = True,
) -> VisionTransformer:
    """ViT-H: width 1024, depth 48 (arcface_torch `vit_h`, trained on WebFace42M without masking)."""
    return _vit(
        "vit_h", num_features, dropout, drop_path_rate, mask_ratio, gradient_checkpointing, fused_attention
    )


def vit_micro(
    num_features: int = 512,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    mask_ratio: float = 0.0,
    gradient_checkpointing: bool = False,
    fused_attention: bool = True,
) -> VisionTransformer:
    """A CPU-sized ViT for demos and tests: width 64, depth 4, 4 heads; not a published size.

    Same blocks, names and 144 tokens as the official sizes, about as many multiply-adds as
    `iresnet_tiny`; official checkpoints never match it.
    """
    width, depth = MICRO_LAYOUT
    return VisionTransformer(
        width,
        depth,
        num_features,
        num_heads=MICRO_HEADS,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
        mask_ratio=mask_ratio,
        gradient_checkpointing=gradient_checkpointing,
        fused_attention=fused_attention,
    )


def vit_forward_flops(model: VisionTransformer, batch: int = 1) -> int:
    """Multiply-add FLOPs (2 per MAC) of an eval forward over `batch` images: matmuls and the patch conv.

    Counts what torch.utils.flop_counter counts (convolution, linear layers, the two attention
    matmuls); norms, softmax and activations are left out, as MFU conventions leave them.
    """
    d, n = model.embed_dim, model.num_patches
    patch = model.patch_embed.proj
    flops = 2 * n * d * patch.in_channels * math.prod(patch.kernel_size)
    for block in model.blocks:
        hidden = block.mlp.fc1.out_features
        flops += 2 * n * d * 3 * d  # qkv
        flops += 2 * 2 * n * n * d  # Q K^T and (attention) V over all heads
        flops += 2 * n * d * d  # proj
        flops += 2 * 2 * n * d * hidden  # fc1, fc2
    flops += 2 * n * d * d + 2 * d * model.feature[2].out_features  # the feature head
    return batch * flops

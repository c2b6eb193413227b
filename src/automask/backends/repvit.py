"""RepViT feature extractor for EdgeTAM's image encoder, without timm.

transformers' `EdgeTamModel` builds its backbone as `TimmWrapperModel(timm.create_model("repvit_m1.dist_in1k",
features_only=True, out_indices=(0, 1, 2, 3)))`, and timm imports torchvision, which does not load beside the CPU
torch wheel. This module is the same network, layer for layer and with the same parameter names, as timm 1.0's
`timm/models/repvit.py` (`RepVit` wrapped in `FeatureListNet` with `flatten_sequential=True`: modules `stem`,
`stages_0` ... `stages_3`), so EdgeTAM checkpoints load into it unchanged
(`vision_encoder.backbone.timm_model.stages_2.blocks.3.token_mixer.conv.c.weight`, ...). tests/test_sam2_heads.py
checks it against timm itself where timm can be imported.

`repvit_backbones()` makes transformers build this class for RepViT `TimmWrapperConfig`s while a model loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TimmWrapperConfig
from transformers.models.timm_wrapper.modeling_timm_wrapper import TimmWrapperModelOutput

VARIANTS: dict[str, dict[str, Any]] = {
    "repvit_m1": {"embed_dim": (48, 96, 192, 384), "depth": (2, 2, 14, 2), "legacy": True},
    "repvit_m2": {"embed_dim": (64, 128, 256, 512), "depth": (2, 2, 12, 2), "legacy": True},
    "repvit_m3": {"embed_dim": (64, 128, 256, 512), "depth": (4, 4, 18, 2), "legacy": True},
    "repvit_m0_9": {"embed_dim": (48, 96, 192, 384), "depth": (2, 2, 14, 2)},
    "repvit_m1_0": {"embed_dim": (56, 112, 224, 448), "depth": (2, 2, 14, 2)},
    "repvit_m1_1": {"embed_dim": (64, 128, 256, 512), "depth": (2, 2, 12, 2)},
    "repvit_m1_5": {"embed_dim": (64, 128, 256, 512), "depth": (4, 4, 24, 4)},
    "repvit_m2_3": {"embed_dim": (80, 160, 320, 640), "depth": (6, 6, 34, 2)},
}
"""timm's registered RepViT models (`repvit_m1(...)` etc.): their embedding widths, depths and `legacy` flag."""


class ConvNorm(nn.Sequential):
    """Conv2d without bias, then BatchNorm2d (timm `ConvNorm`: children 'c', 'bn')."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, 1, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class RepVggDw(nn.Module):
    """Depth-wise 3×3 + 1×1 + identity (timm `RepVggDw`)."""

    def __init__(self, dim: int, kernel_size: int, legacy: bool) -> None:
        super().__init__()
        self.conv = ConvNorm(dim, dim, kernel_size, 1, (kernel_size - 1) // 2, groups=dim)
        self.conv1: nn.Module = ConvNorm(dim, dim, groups=dim) if legacy else nn.Conv2d(dim, dim, 1, groups=dim)
        self.bn: nn.Module = nn.Identity() if legacy else nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class SqueezeExcite(nn.Module):
    """timm `SEModule(dim, rd_ratio=0.25)`: mean-pool, 1×1 conv, ReLU, 1×1 conv, sigmoid gate."""

    def __init__(self, dim: int, rd_ratio: float = 0.25, divisor: int = 8) -> None:
        super().__init__()
        v = dim * rd_ratio  # timm make_divisible(v, 8, round_limit=0.)
        rd = max(divisor, int(v + divisor / 2) // divisor * divisor)
        self.fc1 = nn.Conv2d(dim, rd, 1)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, dim, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * self.gate(s)


class Mlp(nn.Module):
    """timm `RepVitMlp`: 1×1 ConvNorm, GELU, 1×1 ConvNorm."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(dim, hidden)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class Block(nn.Module):
    """timm `RepViTBlock`: token mixer, optional squeeze-excite, residual channel mixer."""

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int, use_se: bool, legacy: bool) -> None:
        super().__init__()
        self.token_mixer = RepVggDw(dim, kernel_size, legacy)
        self.se: nn.Module = SqueezeExcite(dim) if use_se else nn.Identity()
        self.channel_mixer = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.token_mixer(x))
        return x + self.channel_mixer(x)


class Stem(nn.Module):
    """timm `RepVitStem`: two stride-2 3×3 ConvNorms with GELU between (stride 4)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(cin, cout // 2, 3, 2, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(cout // 2, cout, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.conv1(x)))


class Downsample(nn.Module):
    """timm `RepVitDownsample`: a block, stride-2 depth-wise ConvNorm, 1×1 ConvNorm to `cout`, residual MLP."""

    def __init__(self, cin: int, mlp_ratio: float, cout: int, kernel_size: int, legacy: bool) -> None:
        super().__init__()
        self.pre_block = Block(cin, mlp_ratio, kernel_size, use_se=False, legacy=legacy)
        self.spatial_downsample = ConvNorm(cin, cin, kernel_size, 2, (kernel_size - 1) // 2, groups=cin)
        self.channel_downsample = ConvNorm(cin, cout, 1, 1)
        self.ffn = Mlp(cout, int(cout * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.ffn(x)


class Stage(nn.Module):
    """timm `RepVitStage`: optional downsample, then `depth` blocks with squeeze-excite on every other one."""

    def __init__(
        self, cin: int, cout: int, depth: int, mlp_ratio: float, kernel_size: int, downsample: bool, legacy: bool
    ) -> None:
        super().__init__()
        self.downsample: nn.Module = (
            Downsample(cin, mlp_ratio, cout, kernel_size, legacy) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(*(Block(cout, mlp_ratio, kernel_size, i % 2 == 0, legacy) for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class RepVitFeatures(nn.Module):
    """RepViT as timm's `FeatureListNet`: `forward` returns the output of each stage in `out_indices`
    (N×C_i×H/2^(i+2)×W/2^(i+2) float tensors)."""

    def __init__(
        self,
        embed_dim: Sequence[int],
        depth: Sequence[int],
        legacy: bool = False,
        in_chans: int = 3,
        mlp_ratio: float = 2,
        kernel_size: int = 3,
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        self.out_indices = tuple(int(i) for i in out_indices)
        self.stem = Stem(in_chans, embed_dim[0])
        cin = embed_dim[0]
        for i, (dim, d) in enumerate(zip(embed_dim, depth, strict=True)):
            if i > max(self.out_indices):
                break  # FeatureListNet keeps the modules up to the last feature taken
            self.add_module(f"stages_{i}", Stage(cin, dim, d, mlp_ratio, kernel_size, i != 0, legacy))
            cin = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i in range(max(self.out_indices) + 1):
            x = getattr(self, f"stages_{i}")(x)
            if i in self.out_indices:
                out.append(x)
        return out


def features_from_config(architecture: str, model_args: dict[str, Any]) -> RepVitFeatures:
    """`timm.create_model(architecture, **model_args)` for a features_only RepViT, as our module."""
    variant = architecture.split(".")[0]
    if variant not in VARIANTS or not model_args.get("features_only"):
        raise ValueError(
            f"automask runs timm backbones only for EdgeTAM (features_only RepViT); this checkpoint asks for "
            f"'{architecture}' with {model_args}."
        )
    args = {**VARIANTS[variant], **{k: v for k, v in model_args.items() if k != "features_only"}}
    unknown = set(args) - {"embed_dim", "depth", "legacy", "in_chans", "mlp_ratio", "kernel_size", "out_indices"}
    if unknown:
        raise ValueError(f"RepViT option(s) {sorted(unknown)} are not supported by automask's RepViT.")
    return RepVitFeatures(**args)


class RepVitBackbone(PreTrainedModel):
    """Stands in for `TimmWrapperModel` (features_only RepViT): `timm_model` holds the network; the output's
    `last_hidden_state` is the list of feature maps, as TimmWrapperModel returns for features_only models."""

    config_class = TimmWrapperConfig
    config: TimmWrapperConfig
    base_model_prefix = "timm_model"
    main_input_name = "pixel_values"

    def __init__(self, config: TimmWrapperConfig) -> None:
        super().__init__(config)
        self.timm_model = features_from_config(config.architecture, dict(config.model_args or {}))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Checkpoints hold every weight; a model built from a config keeps torch's default initialisation."""

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> TimmWrapperModelOutput:
        features = self.timm_model(pixel_values)
        hidden = features if kwargs.get("output_hidden_states") else None
        return TimmWrapperModelOutput(last_hidden_state=features, pooler_output=None, hidden_states=hidden)


@contextlib.contextmanager
def repvit_backbones() -> Iterator[None]:
    """While the block runs, transformers' `AutoModel` builds `RepVitBackbone` for `TimmWrapperConfig`s (as
    `EdgeTamVisionModel` does for its backbone); the previous mapping is restored after."""
    from transformers import AutoModel

    mapping: Any = AutoModel._model_mapping
    previous = mapping._extra_content.get(TimmWrapperConfig)
    AutoModel.register(TimmWrapperConfig, RepVitBackbone, exist_ok=True)
    try:
        yield
    finally:
        if previous is None:
            mapping._extra_content.pop(TimmWrapperConfig, None)
        else:
            mapping._extra_content[TimmWrapperConfig] = previous

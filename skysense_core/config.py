"""Model configurations as data: one frozen dataclass, four presets.

Every number the papers or the official SkySense++ code give is used as given (see
``shared/research/skysense.md``); numbers nobody published are ours, marked ``[ours]`` below, and are plain
fields so that a run can change them with ``build_model(preset, field=value)``.

The grid contract: the HR encoder's total stride equals ``hr_ratio`` (HR pixels per Sentinel pixel), so its
last stage lands on the Sentinel pixel grid. The patch size of the HR encoder is derived from it:
``hr_patch_size = hr_ratio / 2**(len(hr_depths) - 1)`` (paper: 32 / 8 = 4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from skysense_core.inputs import MODALITIES


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a SkySense / SkySense++ model.

    Encoders
        hr_*: SwinV2 for high-resolution RGB (res-post-norm, cosine window attention, continuous position bias).
        vit_*: one ViT per Sentinel modality, applied to every date independently, patch ``vit_patch_size``,
        no class token. ``s2_bands`` / ``s1_bands`` input channels.
    Fusion
        fusion_*: pre-norm transformer over the per-location token sequence [extra, HR dates, S2 dates, S1 dates].
        ``doy_entries`` = 366 day-of-year positions (leap years exist; the official code has 365 and no leap day).
    Geo-context prototypes
        ``geo_lat_bands`` x ``geo_lon_bands`` regions, ``geo_prototypes`` prototypes each.
    SkySense++ additions
        modality completion (``vae_*``), label vocabulary (``vocab_size`` = 64 label ids + id 0), joint encoding of
        image and label tokens in the first ``hr_merge_stages`` Swin stages / ``vit_merge_layers`` ViT layers.
    """

    name: str = "custom"
    # --- HR encoder: SwinV2 ---
    hr_ratio: int = 32
    hr_in_chans: int = 3
    hr_embed_dim: int = 352
    hr_depths: tuple[int, ...] = (2, 2, 18, 2)
    hr_heads: tuple[int, ...] = (8, 16, 32, 64)
    hr_window: int = 8
    hr_extra_norm_every: int = 6  # mmcls "extra_norm_every_n_blocks": a LayerNorm after every 6th block of a stage
    hr_drop_path: float = 0.2
    # SkySense++ global projected-MHSA after stages 0..n-2 (0 disables): dims 256/512/1024, 16 heads each
    hr_global_attn_dims: tuple[int, ...] = (256, 512, 1024)
    hr_global_attn_heads: int = 16
    # [ours] the global attention attends within square blocks of this many Sentinel px (hr_ratio x that in HR
    # px) instead of over the whole input: 16 = the official input (512 HR px at hr_ratio 32, the S2/S1 16 x 16
    # patch) and our pretraining window, i.e. the context the weights were trained on. Bounded, the cost per
    # pixel does not grow with the inference window and a pixel's features depend on its block only; at an input
    # of one block the result is the official one. 0 = unbounded (the official code at any input size).
    hr_global_attn_block: int = 16
    # --- S2 / S1 encoders: ViT ---
    s2_bands: int = 10
    s1_bands: int = 2
    vit_patch_size: int = 4
    vit_dim: int = 1024
    vit_depth: int = 24
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.0
    vit_drop_path: float = 0.3
    vit_pos_grid: int = 4  # official img_size 16 / patch 4: 4x4 learned positions, resized bicubically at run time
    # --- fusion ---
    fusion_dim: int = 1024
    fusion_depth: int = 24
    fusion_heads: int = 16
    fusion_mlp_ratio: float = 4.0
    fusion_drop_path: float = 0.3
    doy_entries: int = 366
    # [ours] which modalities get the date-specific PE. The paper adds it to every date token of F_T; the
    # official code (where it is switched off) only to S2.
    doy_modalities: tuple[str, ...] = ("hr", "s2", "s1")
    # --- geo-context prototypes ---
    geo_lat_bands: int = 64  # [ours] 64 equal-area latitude bands x 64 longitude sectors = 4096 regions (paper: 4096)
    geo_lon_bands: int = 64
    geo_prototypes: int = 100  # per region (paper)
    geo_temperature: float = 0.1  # [ours] softmax temperature of feature-to-prototype attention (cosine logits)
    geo_momentum: float = 0.99  # [ours] EMA momentum of the prototype update
    geo_sinkhorn_epsilon: float = 0.05  # quoted by one secondary source; unverified
    geo_sinkhorn_iterations: int = 20  # [ours] SwAV uses 3; at small widths columns are then ~12 % off equipartition
    # --- SkySense++ modality completion (conv "VQ-VAE") ---
    vae_conv_dim: int = 256
    vae_codebook: int = 8192
    vae_temperature: float = 0.9
    # --- SkySense++ masked semantic learning ---
    vocab_size: int = 65
    hr_merge_stages: int = 2  # Swin stages that see image and label tokens side by side
    vit_merge_layers: int = 4  # ViT layers that do
    mask_cell: int = 4  # masking cell in Sentinel pixels (official: 128 HR px = 4 S2 px at ratio 32)
    # --- heads ---
    uper_channels: int = 512
    uper_pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    # --- switches ---
    modality_completion: bool = True  # SkySense++: fill modalities a sample lacks (off = SkySense)
    geo_context: bool = True  # append the geo-context prototype attention to the fused feature
    grad_checkpointing: bool = False
    modalities: tuple[str, ...] = MODALITIES
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = len(self.hr_depths)
        if len(self.hr_heads) != n:
            raise ValueError(f"hr_heads {self.hr_heads} must have one entry per stage of hr_depths {self.hr_depths}")
        if self.hr_ratio % (2 ** (n - 1)) or self.hr_ratio < 2 ** (n - 1):
            raise ValueError(
                f"hr_ratio={self.hr_ratio} must be a multiple of 2**(stages-1)={2 ** (n - 1)}: the Swin encoder's "
                f"total stride (patch size x 2 per patch merging) has to equal it"
            )
        if self.hr_global_attn_dims and len(self.hr_global_attn_dims) != n - 1:
            raise ValueError("hr_global_attn_dims needs one entry per stage but the last (or be empty)")
        if not 0 <= self.hr_merge_stages <= n:
            raise ValueError(f"hr_merge_stages must lie in 0..{n}")
        if not 0 <= self.vit_merge_layers <= self.vit_depth:
            raise ValueError(f"vit_merge_layers must lie in 0..{self.vit_depth}")
        if self.doy_entries < 366:
            raise ValueError("doy_entries must be at least 366: day 366 of a leap year has to encode")
        unknown = set(self.modalities) - set(MODALITIES) | set(self.doy_modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {MODALITIES}")

    @property
    def hr_patch_size(self) -> int:
        return self.hr_ratio // 2 ** (len(self.hr_depths) - 1)

    @property
    def hr_dims(self) -> tuple[int, ...]:
        """Channels of each Swin stage output: embed * 2**stage (huge: 352, 704, 1408, 2816)."""
        return tuple(self.hr_embed_dim * 2**i for i in range(len(self.hr_depths)))

    @property
    def token_dim(self) -> int:
        """Width of every modality's tokens on the common grid: the last Swin stage (huge: 2816)."""
        return self.hr_dims[-1]

    @property
    def geo_regions(self) -> int:
        return self.geo_lat_bands * self.geo_lon_bands

    def replace(self, **overrides) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown config fields {bad}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


PRESETS: dict[str, ModelConfig] = {
    # The paper's model: Swin-H 352 [2,2,18,2], ViT-L patch 4, fusion 24x1024, 4096 x 100 prototypes.
    "huge": ModelConfig(name="huge"),
    # [ours] Swin-B / ViT-B widths with the paper's depth pattern; bank cut to 1024 regions x 50.
    "base": ModelConfig(
        name="base", hr_embed_dim=128, hr_heads=(4, 8, 16, 32), hr_global_attn_dims=(128, 256, 512),
        hr_global_attn_heads=8, vit_dim=768, vit_depth=12, vit_heads=12, fusion_dim=768, fusion_depth=12,
        fusion_heads=12, geo_lat_bands=32, geo_lon_bands=32, geo_prototypes=50, vae_conv_dim=128,
        vae_codebook=2048, uper_channels=256, vit_merge_layers=2,
    ),
    # [ours] Swin-T / ViT-S widths.
    "small": ModelConfig(
        name="small", hr_embed_dim=96, hr_depths=(2, 2, 6, 2), hr_heads=(3, 6, 12, 24),
        hr_global_attn_dims=(96, 192, 384), hr_global_attn_heads=6, vit_dim=384, vit_depth=12, vit_heads=6,
        vit_drop_path=0.1, hr_drop_path=0.1, fusion_dim=384, fusion_depth=6, fusion_heads=6, fusion_drop_path=0.1,
        geo_lat_bands=16, geo_lon_bands=16, geo_prototypes=32, vae_conv_dim=64, vae_codebook=1024,
        uper_channels=128, vit_merge_layers=2,
    ),
    # [ours] for CPU tests and the demo: every code path, a few thousand parameters per module. HR ratio 8 (the
    # demo cube's), three Swin stages with patch 2. Global attention in blocks of 4 Sentinel px (32 HR px): at 16
    # its stage-0 attention (4096 tokens per block) alone cost 4.2 MFLOP per pixel, twice the rest of the model,
    # which the demo's 2 CPU cores cannot afford.
    "tiny": ModelConfig(
        name="tiny", hr_ratio=8, hr_embed_dim=16, hr_depths=(1, 1, 2), hr_heads=(1, 2, 4), hr_window=4,
        hr_extra_norm_every=2, hr_drop_path=0.0, hr_global_attn_dims=(16, 16), hr_global_attn_heads=2,
        vit_dim=32, vit_depth=2, vit_heads=2, vit_drop_path=0.0, fusion_dim=32, fusion_depth=2, fusion_heads=2,
        fusion_drop_path=0.0, geo_lat_bands=4, geo_lon_bands=4, geo_prototypes=8, vae_conv_dim=16,
        vae_codebook=32, hr_merge_stages=1, vit_merge_layers=1, uper_channels=32, hr_global_attn_block=4,
    ),
}


def get_config(preset: str | ModelConfig = "tiny", **overrides) -> ModelConfig:
    """The preset's config with ``overrides`` applied; unknown presets and fields are errors."""
    if isinstance(preset, ModelConfig):
        base = preset
    else:
        try:
            base = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base

"""What the model eats: per-modality time series in physical units, with validity and dates.

The cube (``pipeline.zarr_cube``) stores exactly these quantities; the model normalises them itself (the
statistics live here, as data), so a caller can never feed un-normalised or doubly normalised values.

Shapes (B = batch, T = dates of that modality, H x W = Sentinel pixels, r = ``hr_ratio``):

    hr.data   (B, T_hr, 3, H*r, W*r)  float, 0..255 (R, G, B)
    s2.data   (B, T_s2, 10, H, W)     float, L2A reflectance x 1e4 (B02 B03 B04 B05 B06 B07 B08 B8A B11 B12)
    s1.data   (B, T_s1, 2, H, W)      float, backscatter in dB (VV, VH); NaN allowed where invalid
    *.valid   (B, T)                  bool, the date exists (padding dates are False)
    *.mask    (B, T, h, w)            bool, True = usable pixel (not cloud / shadow / nodata); optional
    *.doy     (B, T)                  int64, day of year 1..366 (0 for padding); or (B, T, h, w) on the Sentinel
                                      grid where a sample's parts were observed on other days (few-shot: support
                                      tiles stacked above the query keep their own dates)
    lat, lon  (B,)                    float degrees, tile centre (geo-context prototypes)

A modality that a sample lacks is either absent (``None``) or has ``valid`` all False for that sample.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields, replace

import torch

MODALITIES = ("hr", "s2", "s1")

# Pre-training normalisation of the official SkySense++ code (lib/datasets/utils/dataset_colors.py):
# (x / div - mean) / std per band, NaN -> 0 afterwards.
NORMALISATION: dict[str, dict[str, tuple[float, ...]]] = {
    "hr": {
        "div": (255.0,),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    },
    "s2": {
        "div": (1.0,),
        "mean": (884.297, 1144.162, 1297.473, 1624.910, 2194.642, 2422.212, 2517.761, 2581.647, 2368.512, 1805.068),
        "std": (1155.152, 1183.629, 1368.114, 1370.265, 1355.554, 1416.515, 1474.789, 1439.309, 1455.521, 1343.484),
    },
    "s1": {"div": (1.0,), "mean": (-12.548, -20.192), "std": (5.257, 5.912)},
}


def normalise(modality: str, data: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) physical units -> zero-mean unit-variance per band; NaN and inf become 0."""
    stats = NORMALISATION[modality]
    shape = (-1, 1, 1)
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=data.device).view(shape)
    std = torch.tensor(stats["std"], dtype=torch.float32, device=data.device).view(shape)
    out = (data.float() / stats["div"][0] - mean) / std
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def day_of_year(dates) -> torch.Tensor:
    """Calendar dates (``datetime.date`` / ``numpy.datetime64`` / ISO strings, None for padding) -> int64 1..366."""
    out = []
    for d in dates:
        if d is None:
            out.append(0)
            continue
        if isinstance(d, str):
            d = dt.date.fromisoformat(d[:10])
        elif not isinstance(d, dt.date):  # numpy.datetime64
            d = dt.date.fromisoformat(str(d)[:10])
        out.append(d.timetuple().tm_yday)
    return torch.tensor(out, dtype=torch.int64)


@dataclass
class ModalityInput:
    """One modality's time series; see the module docstring for shapes and units."""

    data: torch.Tensor
    valid: torch.Tensor
    doy: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.data.dim() != 5:
            raise ValueError(f"data must be (B, T, C, H, W), got shape {tuple(self.data.shape)}")
        b, t = self.data.shape[:2]
        if tuple(self.valid.shape) != (b, t) or tuple(self.doy.shape[:2]) != (b, t) or self.doy.dim() not in (2, 4):
            raise ValueError(
                f"valid {tuple(self.valid.shape)} must be (B, T) = {(b, t)} and doy {tuple(self.doy.shape)} (B, T) "
                f"or (B, T, h, w)"
            )
        if self.mask is not None and tuple(self.mask.shape[:2]) != (b, t):
            raise ValueError(f"mask must be (B, T, H, W), got {tuple(self.mask.shape)}")
        if bool(((self.doy < 0) | (self.doy > 366)).any()):
            raise ValueError("doy must be a day of year in 1..366 (0 for padding)")

    @property
    def present(self) -> torch.Tensor:
        """(B,) bool: at least one valid date."""
        return self.valid.any(dim=1)

    def crop(self, ys: slice, xs: slice, scale: int = 1) -> ModalityInput:
        """The same series over rows ``ys`` and columns ``xs`` of the grid (``scale`` px per grid cell: the HR
        ratio for HR); per-pixel days of year are cropped too."""
        ys, xs = slice(ys.start * scale, ys.stop * scale), slice(xs.start * scale, xs.stop * scale)
        doy = self.doy if self.doy.dim() == 2 else self.doy[..., ys.start // scale:ys.stop // scale,
                                                            xs.start // scale:xs.stop // scale]
        return ModalityInput(self.data[..., ys, xs], self.valid, doy,
                             None if self.mask is None else self.mask[..., ys, xs])

    def to(self, device) -> ModalityInput:
        return ModalityInput(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})


@dataclass
class SkySenseInput:
    """A batch: any subset of the three modalities, plus the tile centre for geo-context."""

    hr: ModalityInput | None = None
    s2: ModalityInput | None = None
    s1: ModalityInput | None = None
    lat: torch.Tensor | None = None
    lon: torch.Tensor | None = None

    def __post_init__(self):
        if not self.modalities:
            raise ValueError("a SkySenseInput needs at least one of hr, s2, s1")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    @property
    def batch_size(self) -> int:
        return getattr(self, self.modalities[0]).data.shape[0]

    def grid_size(self, hr_ratio: int) -> tuple[int, int]:
        """(h, w) of the common grid = Sentinel pixels; HR is divided by ``hr_ratio``."""
        for m in ("s2", "s1"):
            x = getattr(self, m)
            if x is not None:
                return tuple(x.data.shape[-2:])
        h, w = self.hr.data.shape[-2:]
        if h % hr_ratio or w % hr_ratio:
            raise ValueError(f"HR size {(h, w)} is not a multiple of hr_ratio {hr_ratio}")
        return h // hr_ratio, w // hr_ratio

    def replace(self, **kw) -> SkySenseInput:
        return replace(self, **kw)

    def crop(self, ys: slice, xs: slice, hr_ratio: int) -> SkySenseInput:
        """The batch over grid rows ``ys`` and columns ``xs`` (views, no copy): what the per-location stages after
        the encoders read when only part of a window is kept (``SkySense.fuse`` of ``Encoded.crop``)."""
        kw = {m: None if getattr(self, m) is None else getattr(self, m).crop(ys, xs, hr_ratio if m == "hr" else 1)
              for m in MODALITIES}
        return SkySenseInput(**kw, lat=self.lat, lon=self.lon)

    def to(self, device) -> SkySenseInput:
        kw = {m: getattr(self, m).to(device) if getattr(self, m) is not None else None for m in MODALITIES}
        kw.update(lat=None if self.lat is None else self.lat.to(device),
                  lon=None if self.lon is None else self.lon.to(device))
        return SkySenseInput(**kw)

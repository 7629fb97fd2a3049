"""The band order of every modality: the one place where it is defined.

Everything downstream (cube arrays, the model's input channels, normalisation statistics) indexes bands
in the order given here. Provider asset keys are mapped onto these names in :mod:`pipeline.providers`.

- Sentinel-2 L2A: surface reflectance x 1e4 (uint16 on disk, 0 = nodata), 10 bands at native 10/20 m.
- Sentinel-1: backscatter VV, VH; in the cube in dB (providers deliver linear power or dB).
- High-resolution RGB: R, G, B (uint8 on disk).
"""

from __future__ import annotations

from dataclasses import dataclass

S2 = "s2"
S1 = "s1"
HR = "hr"
MODALITIES: tuple[str, ...] = (S2, S1, HR)

S2_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S1_BANDS: tuple[str, ...] = ("VV", "VH")
HR_BANDS: tuple[str, ...] = ("R", "G", "B")

# The Sentinel-2 scene classification layer is a mask source, not a model input band.
S2_SCL = "SCL"

BANDS: dict[str, tuple[str, ...]] = {S2: S2_BANDS, S1: S1_BANDS, HR: HR_BANDS}


@dataclass(frozen=True)
class S2BandInfo:
    """Physical description of one Sentinel-2 MSI band (ESA S2 MSI user guide, S2A values)."""

    name: str
    common_name: str
    center_wavelength_um: float
    fwhm_um: float
    native_resolution_m: int


S2_BAND_INFO: dict[str, S2BandInfo] = {
    b.name: b
    for b in (
        S2BandInfo("B02", "blue", 0.490, 0.098, 10),
        S2BandInfo("B03", "green", 0.560, 0.045, 10),
        S2BandInfo("B04", "red", 0.665, 0.038, 10),
        S2BandInfo("B05", "rededge", 0.704, 0.019, 20),
        S2BandInfo("B06", "rededge", 0.740, 0.018, 20),
        S2BandInfo("B07", "rededge", 0.783, 0.028, 20),
        S2BandInfo("B08", "nir", 0.842, 0.145, 10),
        S2BandInfo("B8A", "nir08", 0.865, 0.033, 20),
        S2BandInfo("B11", "swir16", 1.610, 0.143, 20),
        S2BandInfo("B12", "swir22", 2.190, 0.242, 20),
    )
}
assert tuple(S2_BAND_INFO) == S2_BANDS

# Sentinel-2 L2A scene classification (SCL) values, ESA L2A product specification.
SCL_NO_DATA = 0
SCL_SATURATED = 1
SCL_DARK_AREA = 2
SCL_CLOUD_SHADOW = 3
SCL_VEGETATION = 4
SCL_NOT_VEGETATED = 5
SCL_WATER = 6
SCL_UNCLASSIFIED = 7
SCL_CLOUD_MEDIUM = 8
SCL_CLOUD_HIGH = 9
SCL_THIN_CIRRUS = 10
SCL_SNOW = 11
SCL_CLOUDY: tuple[int, ...] = (SCL_CLOUD_SHADOW, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_THIN_CIRRUS)
SCL_INVALID: tuple[int, ...] = (SCL_NO_DATA, SCL_SATURATED) + SCL_CLOUDY
SCL_NAMES: dict[int, str] = {
    0: "no_data",
    1: "saturated_or_defective",
    2: "dark_area_pixels",
    3: "cloud_shadows",
    4: "vegetation",
    5: "not_vegetated",
    6: "water",
    7: "unclassified",
    8: "cloud_medium_probability",
    9: "cloud_high_probability",
    10: "thin_cirrus",
    11: "snow",
}

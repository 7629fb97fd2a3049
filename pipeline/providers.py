"""Provider profiles: which STAC asset (and which band inside it) holds each canonical band.

This is the one place where provider asset keys (Planetary Computer ``B04``, Earth Search v1 ``red``, NAIP's
4-band ``image`` ...) are mapped onto the band names of :mod:`pipeline.bands`. Every other module asks
:func:`resolve_item` and never looks at asset keys itself.

A profile is chosen per item: explicitly (``provider="planetary-computer"``), or with ``provider="auto"``
from the item's own links (``root``/``self``/``collection`` host names), or from the ``providers`` common
metadata that the demo generator writes. A collection a profile does not know and a band whose asset is missing
each raise an error that names the item and the band.

An item that matches no profile (a user's own catalog: no provider link, no ``providers`` metadata) is read with
the ``generic`` profile (:func:`resolve_generic`), with a warning naming it: its modality and bands are found
from the item itself, by asset keys that are band names, ``eo:bands`` / STAC 1.1 ``bands`` names, common names
and centre wavelengths, and ``sar:polarizations``; Sentinel-1 values are dB when ``raster:bands`` says so
(and, in the cube builder, when the values are mostly negative, which linear power never is).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pystac

from pipeline.bands import HR, HR_BANDS, S1, S2, S2_BANDS, S2_SCL

AUTO = "auto"
S1Values = Literal["linear_power", "amplitude_dn", "db"]


class ProviderError(ValueError):
    """Base class: an item cannot be mapped onto the canonical bands."""


class UnknownProviderError(ProviderError):
    pass


class UnknownCollectionError(ProviderError):
    pass


class MissingBandError(ProviderError):
    pass


class NoUsableBandError(MissingBandError):
    """A generic item in which no modality's bands were found (the message names what was looked for)."""


@dataclass(frozen=True)
class AssetBand:
    """Where one canonical band lives: an asset key and, for multi-band assets, which band in it.

    ``common_name`` picks the band through the asset's ``eo:bands`` (NAIP ``image`` is R, G, B, NIR);
    ``index`` (1-based, as in rasterio) is used when the asset carries no ``eo:bands``.
    """

    asset: str
    index: int = 1
    common_name: str | None = None


@dataclass(frozen=True)
class CollectionProfile:
    modality: str
    bands: Mapping[str, AssetBand]
    masks: Mapping[str, AssetBand] = field(default_factory=dict)
    # Sentinel-1 only: what the pixel values are, and whether the raster is in map or radar geometry.
    s1_values: S1Values | None = None
    geometry: Literal["map", "radar"] = "map"


@dataclass(frozen=True)
class ProviderProfile:
    name: str
    # Substrings of link hrefs (rel root/self/parent/collection) that identify the provider.
    link_markers: tuple[str, ...]
    collections: Mapping[str, CollectionProfile]


@dataclass(frozen=True)
class BandRef:
    """A canonical band resolved to a readable raster: ``href`` and the 1-based ``band_index`` in it."""

    band: str
    asset_key: str
    href: str
    band_index: int


@dataclass(frozen=True)
class ResolvedItem:
    item_id: str
    collection: str
    provider: str
    modality: str
    bands: dict[str, BandRef]
    masks: dict[str, BandRef]
    profile: CollectionProfile
    # Sentinel-1 only: the profile's value type, unless the asset's raster:bands "unit" says dB.
    s1_values: S1Values | None = None


def _same_keys(keys: Mapping[str, str]) -> dict[str, AssetBand]:
    return {band: AssetBand(asset) for band, asset in keys.items()}


# Planetary Computer and Earth Search v0 (sentinel-s2-l2a-cogs) name S2 assets after the bands.
_S2_BAND_KEYS = _same_keys({b: b for b in S2_BANDS})
_S2_SCL_KEY = {S2_SCL: AssetBand("SCL")}
# Earth Search v1 uses common names (https://earth-search.aws.element84.com/v1/collections/sentinel-2-l2a).
_S2_EARTH_SEARCH_V1 = _same_keys(
    {
        "B02": "blue",
        "B03": "green",
        "B04": "red",
        "B05": "rededge1",
        "B06": "rededge2",
        "B07": "rededge3",
        "B08": "nir",
        "B8A": "nir08",
        "B11": "swir16",
        "B12": "swir22",
    }
)
_S1_VV_VH = _same_keys({"VV": "vv", "VH": "vh"})
# NAIP (and the demo HR) deliver one multi-band "image" asset; R, G, B are picked by common name.
_RGB_IMAGE = {
    band: AssetBand("image", index=i + 1, common_name=cn)
    for i, (band, cn) in enumerate(zip(HR_BANDS, ("red", "green", "blue"), strict=True))
}

_PC_S2 = CollectionProfile(S2, _S2_BAND_KEYS, _S2_SCL_KEY)
_PC_S1_RTC = CollectionProfile(S1, _S1_VV_VH, s1_values="linear_power", geometry="map")
_GRD = CollectionProfile(S1, _S1_VV_VH, s1_values="amplitude_dn", geometry="radar")
_NAIP = CollectionProfile(HR, _RGB_IMAGE)

PLANETARY_COMPUTER = ProviderProfile(
    name="planetary-computer",
    link_markers=("planetarycomputer.microsoft.com",),
    collections={
        "sentinel-2-l2a": _PC_S2,
        "sentinel-1-rtc": _PC_S1_RTC,
        "sentinel-1-grd": _GRD,
        "naip": _NAIP,
    },
)
EARTH_SEARCH = ProviderProfile(
    name="earth-search",
    link_markers=("earth-search.aws.element84.com", "s3://sentinel-cogs/"),
    collections={
        "sentinel-2-l2a": CollectionProfile(S2, _S2_EARTH_SEARCH_V1, {S2_SCL: AssetBand("scl")}),
        # Earth Search v0 collection, same keys as Planetary Computer.
        "sentinel-s2-l2a-cogs": _PC_S2,
        "sentinel-1-grd": _GRD,
        "naip": _NAIP,
    },
)
# Catalogs made by this project, with Planetary Computer asset keys: the embedded demo region (pipeline.demo)
# and "local" catalogs that wrap a user's own files as STAC. Both are recognised by their items' `providers`.
_OWN_COLLECTIONS = {
    "sentinel-2-l2a": _PC_S2,
    "sentinel-1-rtc": _PC_S1_RTC,
    "sentinel-1-grd": CollectionProfile(S1, _S1_VV_VH, s1_values="linear_power", geometry="radar"),
    "hr-rgb": CollectionProfile(HR, _RGB_IMAGE),
    "naip": _NAIP,
}
DEMO_PROVIDER_NAME = "skysense-demo"
DEMO = ProviderProfile(name=DEMO_PROVIDER_NAME, link_markers=(), collections=_OWN_COLLECTIONS)
LOCAL_PROVIDER_NAME = "local"
LOCAL = ProviderProfile(name=LOCAL_PROVIDER_NAME, link_markers=(), collections=_OWN_COLLECTIONS)

PROFILES: dict[str, ProviderProfile] = {p.name: p for p in (PLANETARY_COMPUTER, EARTH_SEARCH, DEMO, LOCAL)}


# --------------------------------------------------------------------------------------------------- generic
GENERIC_PROVIDER_NAME = "generic"
# [ours] Names (asset keys, eo:bands / bands "name"), compared case-insensitively, under which catalogs publish
# each canonical band: ESA band ids with and without the leading zero, Earth Search v1 keys, STAC common names
# where one names one band (the three red-edge bands share "rededge": they are told apart by wavelength).
GENERIC_NAMES: dict[str, tuple[str, ...]] = {
    "B02": ("b02", "b2", "blue"), "B03": ("b03", "b3", "green"), "B04": ("b04", "b4", "red"),
    "B05": ("b05", "b5", "rededge1", "rededge071"), "B06": ("b06", "b6", "rededge2", "rededge075"),
    "B07": ("b07", "b7", "rededge3", "rededge078"), "B08": ("b08", "b8", "nir"), "B8A": ("b8a", "nir08"),
    "B11": ("b11", "swir16"), "B12": ("b12", "swir22"), S2_SCL: ("scl", "scene_classification"),
    "VV": ("vv",), "VH": ("vh",), "R": ("r", "red"), "G": ("g", "green"), "B": ("b", "blue"),
}
_GENERIC_COMMON = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "B8A": "nir08", "B11": "swir16",
                   "B12": "swir22", "R": "red", "G": "green", "B": "blue"}
GENERIC_HR_MAX_GSD = 5.0  # [ours] m: an RGB item with a coarser "gsd" is not read as high-resolution imagery
_NOT_DATA_ROLES = {"thumbnail", "overview", "metadata", "visual"}  # a TCI / preview is never a band source


@dataclass(frozen=True)
class _BandSource:
    asset: str
    index: int  # 1-based band in the asset
    names: frozenset[str]
    common_name: str | None
    wavelength_um: float | None


def _band_sources(assets: Mapping[str, Any]) -> list[_BandSource]:
    """Every (asset, band) of an item that could hold a band, with the names it goes by."""
    out = []
    for key, a in assets.items():
        roles = set(a.get("roles") or [])
        if roles & _NOT_DATA_ROLES and "data" not in roles:
            continue
        listed = a.get("eo:bands") or a.get("bands") or []
        if not listed:
            out.append(_BandSource(key, 1, frozenset({key.lower()}), None, None))
            continue
        for i, b in enumerate(listed):
            names = {str(b.get("name", "")).lower()} - {""}
            if len(listed) == 1:
                names.add(key.lower())
            wl = b.get("center_wavelength", b.get("eo:center_wavelength"))
            out.append(_BandSource(key, i + 1, frozenset(names), b.get("common_name", b.get("eo:common_name")),
                                   float(wl) if wl is not None else None))
    return out


def _find(band: str, sources: list[_BandSource]) -> _BandSource | None:
    """The source of one canonical band: by name first, then by an unambiguous common name, then (Sentinel-2)
    by a centre wavelength within half the band's width."""
    from pipeline.bands import S2_BAND_INFO

    hits = [s for s in sources if s.names & set(GENERIC_NAMES.get(band, ()))]
    if hits:
        return hits[0]
    cn = _GENERIC_COMMON.get(band)
    hits = [s for s in sources if cn is not None and s.common_name == cn]
    if len(hits) == 1:
        return hits[0]
    info = S2_BAND_INFO.get(band)
    if info is not None:
        hits = [s for s in sources if s.wavelength_um is not None
                and abs(s.wavelength_um - info.center_wavelength_um) <= info.fwhm_um / 2]
        if len(hits) == 1:
            return hits[0]
    return None


def resolve_generic(item: pystac.Item | Mapping[str, Any], bands: tuple[str, ...] | None = None) -> ResolvedItem:
    """An item of no known provider read from its own metadata (module docstring). The modality is the first of
    Sentinel-1 (VV and VH), Sentinel-2 (all ten bands) and high-resolution RGB whose bands are all found.
    Raises :class:`NoUsableBandError` naming the item, its assets and the bands looked for."""
    d = item.to_dict(include_self_link=True, transform_hrefs=False) if isinstance(item, pystac.Item) else item
    item_id, collection = d.get("id"), d.get("collection")
    assets = d.get("assets", {})
    sources = _band_sources(assets)
    gsd = d.get("properties", {}).get("gsd")
    kinds = [(S1, ("VV", "VH")), (S2, S2_BANDS)]
    if gsd is None or float(gsd) <= GENERIC_HR_MAX_GSD:  # red, green and blue at 30 m are not high resolution
        kinds.append((HR, HR_BANDS))
    candidates = [(m, {b: _find(b, sources) for b in canonical}) for m, canonical in kinds]
    modality, found = next(((m, f) for m, f in candidates if all(f.values())), (None, {}))
    if modality is None:
        raise NoUsableBandError(
            f"item {item_id!r} (collection {collection!r}, no known provider: read as 'generic'): no modality's "
            f"bands found among its assets {sorted(assets)}; looked for Sentinel-1 VV+VH, Sentinel-2 "
            f"{'+'.join(S2_BANDS)} and RGB R+G+B (gsd <= {GENERIC_HR_MAX_GSD:g} m) by asset key, eo:bands / "
            "bands name, common name and centre wavelength"
        )
    cp = CollectionProfile(modality, {b: AssetBand(f.asset, f.index) for b, f in found.items()},
                           s1_values="linear_power" if modality == S1 else None)
    if modality == S2 and (scl := _find(S2_SCL, sources)) is not None:
        cp = CollectionProfile(S2, cp.bands, {S2_SCL: AssetBand(scl.asset, scl.index)})
    generic = ProviderProfile(GENERIC_PROVIDER_NAME, (), {collection: cp})
    return resolve_item(d, generic, bands)


def get_profile(name: str) -> ProviderProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProviderError(f"unknown provider {name!r}; known providers: "
                               f"{', '.join([*PROFILES, GENERIC_PROVIDER_NAME])}") from None


def detect_provider(item: pystac.Item | Mapping[str, Any]) -> ProviderProfile:
    """The provider of ``item`` from its links, else from its ``providers`` common metadata."""
    d = item.to_dict(include_self_link=True, transform_hrefs=False) if isinstance(item, pystac.Item) else item
    hrefs = [
        ln.get("href", "") for ln in d.get("links", []) if ln.get("rel") in ("root", "self", "parent", "collection")
    ]
    for profile in PROFILES.values():
        if any(marker in href for marker in profile.link_markers for href in hrefs):
            return profile
    names = {p.get("name") for p in d.get("properties", {}).get("providers", []) or []}
    for profile in PROFILES.values():
        if profile.name in names:
            return profile
    raise UnknownProviderError(
        f"item {d.get('id')!r} (collection {d.get('collection')!r}): cannot tell its provider from its links "
        f"{hrefs[:4]} or its 'providers' metadata; pass provider= one of {', '.join(PROFILES)}"
    )


def _band_index(item_id: str, asset_key: str, asset: Mapping[str, Any], ab: AssetBand, band: str) -> int:
    if ab.common_name is None:
        return ab.index
    eo_bands = asset.get("eo:bands") or asset.get("bands") or []
    if not eo_bands:
        return ab.index
    for i, b in enumerate(eo_bands):
        if b.get("common_name", b.get("eo:common_name")) == ab.common_name:
            return i + 1
    raise MissingBandError(
        f"item {item_id!r}: asset {asset_key!r} has no band with common_name {ab.common_name!r} for band {band!r} "
        f"(its bands: {[b.get('common_name', b.get('name')) for b in eo_bands]})"
    )


def resolve_item(
    item: pystac.Item | Mapping[str, Any],
    provider: str | ProviderProfile = AUTO,
    bands: tuple[str, ...] | None = None,
) -> ResolvedItem:
    """Map ``item``'s assets onto canonical band names. ``provider``: a profile name, ``"auto"`` (detected; the
    ``generic`` profile when none matches: the result's ``provider`` says so) or ``"generic"``.

    ``bands``: the canonical bands (or mask layers such as ``SCL``) wanted; default: all of the item's
    modality plus its mask layers.
    Raises :class:`UnknownProviderError`, :class:`UnknownCollectionError` or :class:`MissingBandError`,
    each naming the item (and the band).
    """
    d = item.to_dict(include_self_link=True, transform_hrefs=False) if isinstance(item, pystac.Item) else item
    item_id = d.get("id")
    if isinstance(provider, ProviderProfile):
        profile = provider
    elif provider == GENERIC_PROVIDER_NAME:
        return resolve_generic(d, bands)
    elif provider == AUTO:
        try:
            profile = detect_provider(d)
        except UnknownProviderError:
            return resolve_generic(d, bands)
    else:
        profile = get_profile(provider)
    collection = d.get("collection")
    cp = profile.collections.get(collection)
    if cp is None:
        raise UnknownCollectionError(
            f"item {item_id!r}: collection {collection!r} is not in the {profile.name} profile "
            f"(known: {', '.join(profile.collections)})"
        )
    assets = d.get("assets", {})
    wanted = bands if bands is not None else tuple(cp.bands)

    def ref(band: str, ab: AssetBand) -> BandRef:
        asset = assets.get(ab.asset)
        if asset is None:
            raise MissingBandError(
                f"item {item_id!r} ({profile.name} {collection}): no asset {ab.asset!r} for band {band!r} "
                f"(assets: {', '.join(sorted(assets))})"
            )
        return BandRef(band, ab.asset, asset["href"], _band_index(item_id, ab.asset, asset, ab, band))

    resolved: dict[str, BandRef] = {}
    masks: dict[str, BandRef] = {}
    for band in wanted:
        if band in cp.bands:
            resolved[band] = ref(band, cp.bands[band])
        elif band in cp.masks:
            masks[band] = ref(band, cp.masks[band])
        else:
            raise MissingBandError(
                f"item {item_id!r} ({profile.name} {collection}, modality {cp.modality}): no band {band!r} "
                f"(bands: {', '.join(list(cp.bands) + list(cp.masks))})"
            )
    if bands is None:
        # Mask layers are optional (BigEarthNet-style S2 has no SCL): masks then come from nodata alone.
        masks = {name: ref(name, ab) for name, ab in cp.masks.items() if ab.asset in assets}
    s1_values = None
    if cp.modality == S1:
        units = {
            str((assets[cp.bands[b].asset].get("raster:bands") or [{}])[0].get("unit", "")).lower() for b in resolved
        }
        s1_values = "db" if units <= {"db", "decibel", "decibels"} and units else cp.s1_values
    return ResolvedItem(item_id, collection, profile.name, cp.modality, resolved, masks, cp, s1_values)

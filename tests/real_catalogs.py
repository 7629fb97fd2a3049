"""Static STAC catalogs over the real test data (../shared/data/real) and over the demo region, for tests.

Each builder writes a self-contained static catalog under ``out`` (provider ``local``, so that
:func:`pipeline.providers.resolve_item` recognises the items) and returns the path of its ``catalog.json``.
Asset hrefs are absolute paths to the original files: the real data are read in place, never copied.

- :func:`bigearthnet_catalog`: the 6 BigEarthNet-MM patch pairs as ``sentinel-2-l2a`` (10 bands at 10/20 m,
  no SCL) and ``sentinel-1-rtc`` (VV/VH in dB on the S2 patch grid) items, with the CORINE labels.
- :func:`naip_series_catalog`: the 10-date NAIP series of one quarter-quad (R, G, B, NIR at 5 m).
- :func:`subset_catalog`: the items of some collections of an existing static catalog.
- :func:`grd_catalog`: a demo ``sentinel-1-rtc`` item turned into a GRD-like item in radar geometry (the
  array flipped in both axes, georeferenced only by ground control points).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from pystac.extensions.sar import FrequencyBand, Polarization, SarExtension
from pystac.extensions.sat import SatExtension
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from shapely.geometry import box, mapping

from pipeline import bands as B
from pipeline.demo import s2_eo_bands
from pipeline.providers import LOCAL_PROVIDER_NAME

S2_COLLECTION = "sentinel-2-l2a"
S1_RTC_COLLECTION = "sentinel-1-rtc"
S1_GRD_COLLECTION = "sentinel-1-grd"
NAIP_COLLECTION = "naip"

BIGEARTHNET = Path("bigearthnet-common")
BIGEARTHNET_S2 = BIGEARTHNET / "BigEarthNet-S2-Example"
BIGEARTHNET_S1 = BIGEARTHNET / "BigEarthNet-S1-Example"
NAIP_SERIES = Path("opengeos-data") / "naip"
NAIP_BANDS = (("Red", "red"), ("Green", "green"), ("Blue", "blue"), ("NIR", "nir"))

GCP_CRS = CRS.from_epsg(4326)


def _providers(description: str) -> list[pystac.Provider]:
    return [pystac.Provider(name=LOCAL_PROVIDER_NAME, roles=[pystac.ProviderRole.PRODUCER], description=description)]


def _footprint(src) -> shapely.Polygon:
    """The outline of an open dataset, densified (4 segments per side), in lon/lat (x = lon, y = lat)."""
    outline = box(*src.bounds)
    outline = shapely.segmentize(
        outline, max(outline.bounds[2] - outline.bounds[0], outline.bounds[3] - outline.bounds[1]) / 4
    )
    xs, ys = np.asarray(outline.exterior.coords).T
    lon, lat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    return shapely.Polygon(np.column_stack([lon, lat]))


def _epsg_code(crs: CRS) -> str:
    epsg = crs.to_epsg()
    if epsg is None:
        raise ValueError(f"CRS {crs} has no EPSG code")
    return f"EPSG:{epsg}"


def _new_item(item_id: str, dt: datetime, geom, collection: str, proj_code: str | None, description: str):
    item = pystac.Item(
        id=item_id, geometry=mapping(geom), bbox=list(geom.bounds), datetime=dt, properties={}, collection=collection
    )
    item.common_metadata.providers = _providers(description)
    if proj_code is not None:
        ProjectionExtension.ext(item, add_if_missing=True).code = proj_code
    return item


def _add_file_asset(
    item: pystac.Item,
    key: str,
    path: Path,
    title: str,
    raster: list[RasterBand],
    eo_bands: list[Band] | None = None,
    roles: Sequence[str] = ("data",),
    media_type: str = pystac.MediaType.GEOTIFF,
) -> None:
    """Add a map-geometry GeoTIFF asset with proj:shape / proj:transform as rasterio reads them from ``path``."""
    path = Path(path).resolve()
    with rasterio.open(path) as src:
        shape, transform = (src.height, src.width), src.transform
    asset = pystac.Asset(href=str(path), media_type=media_type, title=title, roles=list(roles))
    item.add_asset(key, asset)
    proj = ProjectionExtension.ext(asset)
    proj.shape = list(shape)
    proj.transform = list(transform)[:6]
    RasterExtension.ext(asset, add_if_missing=True).bands = raster
    if eo_bands:
        EOExtension.ext(asset, add_if_missing=True).bands = eo_bands


def _raster_band(src, data_type: DataType, **extra) -> RasterBand:
    """raster:bands entry of band 1 of an open dataset: nodata only when the file sets one."""
    return RasterBand.create(nodata=src.nodata, data_type=data_type, spatial_resolution=abs(src.res[0]), **extra)


def _collection(cid: str, title: str, description: str, items: list[pystac.Item], license_: str) -> pystac.Collection:
    collection = pystac.Collection(
        id=cid,
        title=title,
        description=description,
        extent=pystac.Extent.from_items(items),
        license=license_,
        providers=_providers(description),
    )
    for item in items:
        collection.add_item(item)
    return collection


def _save(catalog: pystac.Catalog, out: Path) -> Path:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    catalog.normalize_hrefs(str(out))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


# --------------------------------------------------------------------------------------------- BigEarthNet

# S2A_MSIL2A_20170613T101031_87_48, S2B_MSIL2A_20170924T93020_69_24 (BigEarthNet drops the hour's leading
# zero), S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48.
_BEN_TIME = re.compile(r"_(\d{8})T(\d{5,6})_")


def bigearthnet_datetime(name: str, labels_meta: dict | None = None) -> datetime:
    """Acquisition time (UTC) from a BigEarthNet patch name, e.g. ``..._20170613T101031_...`` -> 2017-06-13 10:10:31.

    The names drop the hour's leading zero (``T93020`` is 09:30:20). One name has an impossible time
    (``S2B_MSIL2A_20180204T94161_57_38``: second 61); then the labels metadata's ``acquisition_date`` /
    ``acquisition_time`` is used.
    """
    m = _BEN_TIME.search(name)
    if m is None:
        raise ValueError(f"no acquisition time in BigEarthNet name {name!r}")
    try:
        return datetime.strptime(m.group(1) + m.group(2).zfill(6), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        stamp = (labels_meta or {}).get("acquisition_date") or (labels_meta or {}).get("acquisition_time")
        if not stamp:
            raise ValueError(f"invalid acquisition time in BigEarthNet name {name!r} and no labels metadata") from None
        return datetime.fromisoformat(stamp.replace(" ", "T")).replace(tzinfo=timezone.utc)


def _labels_meta(folder: Path) -> dict:
    return json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())


def _bigearthnet_s2_item(folder: Path) -> pystac.Item:
    name = folder.name
    meta = _labels_meta(folder)
    with rasterio.open(folder / f"{name}_B02.tif") as src:
        geom = _footprint(src)
        code = _epsg_code(src.crs)
    item = _new_item(
        name, bigearthnet_datetime(name, meta), geom, S2_COLLECTION, code, "BigEarthNet-S2 example patch (real)"
    )
    item.common_metadata.platform = {"S2A": "Sentinel-2A", "S2B": "Sentinel-2B"}[name[:3]]
    item.common_metadata.constellation = "Sentinel 2"
    item.common_metadata.instruments = ["msi"]
    item.common_metadata.gsd = 10.0
    EOExtension.ext(item, add_if_missing=True).cloud_cover = 0.0  # BigEarthNet patches are cloud-free
    tile = re.search(r"_T(\d{2}[A-Z]{3})_", meta.get("tile_source", ""))
    if tile:
        item.properties["s2:mgrs_tile"] = tile.group(1)
    item.properties["bigearthnet:labels"] = list(meta["labels"])
    item.properties["bigearthnet:tile_source"] = meta.get("tile_source")
    for band in B.S2_BANDS:  # B01 and B09 (60 m) are not model bands
        path = folder / f"{name}_{band}.tif"
        with rasterio.open(path) as src:
            raster = _raster_band(src, DataType.UINT16)
        eo = s2_eo_bands(band)
        _add_file_asset(
            item,
            band,
            path,
            f"Band {band} - {int(raster.spatial_resolution)}m",
            [raster],
            eo,
            roles=("data", "reflectance"),
        )
    return item


def _bigearthnet_s1_item(folder: Path) -> pystac.Item:
    name = folder.name
    meta = _labels_meta(folder)
    with rasterio.open(folder / f"{name}_VV.tif") as src:
        geom = _footprint(src)
        code = _epsg_code(src.crs)
    item = _new_item(
        name, bigearthnet_datetime(name, meta), geom, S1_RTC_COLLECTION, code, "BigEarthNet-S1 example patch (real)"
    )
    item.common_metadata.platform = {"S1A": "SENTINEL-1A", "S1B": "SENTINEL-1B"}[name[:3]]
    item.common_metadata.constellation = "Sentinel-1"
    item.common_metadata.instruments = ["c-sar"]
    SarExtension.ext(item, add_if_missing=True).apply(
        instrument_mode="IW",
        frequency_band=FrequencyBand.C,
        polarizations=[Polarization.VV, Polarization.VH],
        product_type="GRD",
    )
    scene = meta.get("scene_source", "")
    orbit = re.match(r"S1[AB]_IW_GRD._1S.._\d{8}T\d{6}_\d{8}T\d{6}_(\d{6})_", scene)
    if orbit:
        SatExtension.ext(item, add_if_missing=True).absolute_orbit = int(orbit.group(1))
    item.properties["bigearthnet:s2_patch"] = meta["corresponding_s2_patch"]
    item.properties["bigearthnet:labels"] = list(meta["labels"])
    item.properties["bigearthnet:scene_source"] = scene
    for pol, key in (("VV", "vv"), ("VH", "vh")):
        path = folder / f"{name}_{pol}.tif"
        with rasterio.open(path) as src:
            raster = _raster_band(src, DataType.FLOAT32, unit="dB")
        _add_file_asset(item, key, path, f"{pol}: backscatter (dB)", [raster])
    return item


def bigearthnet_catalog(real_data: Path, out: Path) -> Path:
    """The BigEarthNet-MM example patches as ``sentinel-2-l2a`` and ``sentinel-1-rtc`` items (provider ``local``).

    S2: one item per patch folder (id = folder name), assets ``B02 ... B12`` (not B01/B09) at 10/20 m, no SCL,
    ``eo:cloud_cover`` 0. S1: one item per patch folder, assets ``vv``/``vh`` with unit dB (BigEarthNet S1 is
    backscatter in dB on the S2 patch grid), ``bigearthnet:s2_patch`` naming the S2 item. Both carry the
    CORINE labels in ``bigearthnet:labels``.
    """
    real_data = Path(real_data).resolve()
    s2_items = [_bigearthnet_s2_item(d) for d in sorted((real_data / BIGEARTHNET_S2).iterdir()) if d.is_dir()]
    s1_items = [_bigearthnet_s1_item(d) for d in sorted((real_data / BIGEARTHNET_S1).iterdir()) if d.is_dir()]
    if not s2_items or not s1_items:
        raise FileNotFoundError(f"no BigEarthNet patches under {real_data / BIGEARTHNET}")
    catalog = pystac.Catalog(
        id="bigearthnet-examples",
        title="BigEarthNet-MM examples",
        description="The BigEarthNet-MM example patches of the bigearthnet-common wheel (real Sentinel-2 L2A and "
        "Sentinel-1 backscatter in dB, with CORINE labels), read in place.",
    )
    lic = "CDLA-Permissive-1.0"
    catalog.add_child(
        _collection(S2_COLLECTION, "BigEarthNet-S2", "BigEarthNet Sentinel-2 L2A patches (10 bands).", s2_items, lic)
    )
    catalog.add_child(
        _collection(S1_RTC_COLLECTION, "BigEarthNet-S1", "BigEarthNet Sentinel-1 VV/VH patches (dB).", s1_items, lic)
    )
    return _save(catalog, out)


# --------------------------------------------------------------------------------------------- NAIP series

_NAIP_DATE = re.compile(r"_(\d{8})\.tif$")


def naip_series_catalog(real_data: Path, out: Path) -> Path:
    """The 10-date NAIP series of quarter-quad m_4709963_se (EPSG:26914, 5 m) as ``naip`` items.

    One 4-band ``image`` asset per item (R, G, B, NIR uint8, nodata as the file says); each file keeps its own
    grid (origins differ by 1-3 m between years, heights by one pixel). Datetime: noon UTC of the file's date.
    """
    real_data = Path(real_data).resolve()
    files = sorted((real_data / NAIP_SERIES).glob("m_4709963_se_14_1_*.tif"))
    if not files:
        raise FileNotFoundError(f"no NAIP series under {real_data / NAIP_SERIES}")
    items = []
    for path in files:
        m = _NAIP_DATE.search(path.name)
        if m is None:
            raise ValueError(f"no date in NAIP file name {path.name!r}")
        dt = datetime.strptime(m.group(1), "%Y%m%d").replace(hour=12, tzinfo=timezone.utc)
        with rasterio.open(path) as src:
            if src.count != len(NAIP_BANDS):
                raise ValueError(f"{path}: {src.count} bands, expected {len(NAIP_BANDS)} (R, G, B, NIR)")
            geom = _footprint(src)
            code = _epsg_code(src.crs)
            raster = [
                RasterBand.create(nodata=nd, data_type=DataType(dt_), spatial_resolution=abs(src.res[0]))
                for nd, dt_ in zip(src.nodatavals, src.dtypes, strict=True)
            ]
            gsd = abs(src.res[0])
        item = _new_item(path.stem, dt, geom, NAIP_COLLECTION, code, "NAIP quarter-quad, resampled to 5 m (real)")
        item.common_metadata.gsd = gsd
        item.common_metadata.platform = "aerial"
        item.common_metadata.instruments = ["naip"]
        item.properties["naip:year"] = m.group(1)[:4]
        item.properties["naip:state"] = "nd"
        eo = [Band.create(name=n, common_name=cn) for n, cn in NAIP_BANDS]
        _add_file_asset(item, "image", path, "RGBIR image", raster, eo, roles=("data",))
        items.append(item)
    catalog = pystac.Catalog(
        id="naip-series",
        title="NAIP time series",
        description="A 10-date NAIP series of one North Dakota quarter-quad (opengeos/data), read in place.",
    )
    catalog.add_child(
        _collection(NAIP_COLLECTION, "NAIP", "NAIP R, G, B, NIR at 5 m, 2009-2020.", items, "proprietary")
    )
    return _save(catalog, out)


# --------------------------------------------------------------------------------------------- subset


def _detached_item(item: pystac.Item) -> pystac.Item:
    """A copy of ``item`` with absolute asset hrefs and none of its catalog links."""
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    d["links"] = [ln for ln in d.get("links", []) if ln.get("rel") not in ("root", "parent", "collection", "self")]
    new = pystac.Item.from_dict(d, preserve_dict=False)
    for key, asset in new.assets.items():
        asset.href = item.assets[key].get_absolute_href()
    return new


def subset_catalog(src_catalog: Path, collections: Sequence[str], out: Path) -> Path:
    """A static catalog with the items of ``collections`` (ids, collection metadata kept) of ``src_catalog``."""
    src = pystac.Catalog.from_file(str(Path(src_catalog).resolve()))
    children = {c.id: c for c in src.get_all_collections()}
    missing = [c for c in collections if c not in children]
    if missing:
        raise KeyError(f"{src_catalog}: no collection {missing} (available: {', '.join(sorted(children))})")
    catalog = pystac.Catalog(
        id=f"{src.id}-subset",
        title=f"{src.title or src.id}: {', '.join(collections)}",
        description=f"The {', '.join(collections)} items of {src.id}; asset hrefs point to the original files.",
    )
    for cid in collections:
        col = children[cid]
        d = col.to_dict(include_self_link=False, transform_hrefs=False)
        d["links"] = [
            ln for ln in d.get("links", []) if ln.get("rel") not in ("root", "parent", "self", "item", "child")
        ]
        new = pystac.Collection.from_dict(d, preserve_dict=False)
        for item in col.get_items():
            new.add_item(_detached_item(item))
        catalog.add_child(new)
    return _save(catalog, out)


# --------------------------------------------------------------------------------------------- GRD


def grd_gcps(
    transform: Affine, crs: CRS, shape: Sequence[int], n: int = 11, flip: bool = True, offset: float = 0.5
) -> list[GroundControlPoint]:
    """An ``n`` x ``n`` grid of GCPs (lon/lat, EPSG:4326) for a map-geometry grid flipped in both axes.

    GRD pixel (r, c) holds map pixel (H-1-r, W-1-c). Each GCP sits at the centre of a GRD pixel, at GRD
    pixel-space position (r + 0.5, c + 0.5), with the lon/lat of the centre of map pixel (H-1-r, W-1-c);
    r and c run from the first to the last pixel. ``flip=False`` and ``offset`` other than 0.5 (the pixel
    centre) build deliberately wrong sets for tests.
    """
    h, w = shape
    rr, cc = np.meshgrid(np.linspace(0, h - 1, n), np.linspace(0, w - 1, n), indexing="ij")
    map_r, map_c = (h - 1 - rr, w - 1 - cc) if flip else (rr, cc)
    x, y = rasterio.transform.xy(transform, map_r.ravel(), map_c.ravel(), offset="center")
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return [
        GroundControlPoint(row=float(r) + offset, col=float(c) + offset, x=float(lo), y=float(la), z=0.0, id=str(k))
        for k, (r, c, lo, la) in enumerate(zip(rr.ravel(), cc.ravel(), lon, lat, strict=True))
    ]


def _find_item(catalog: pystac.Catalog, item_id: str) -> pystac.Item:
    for item in catalog.get_items(item_id, recursive=True):
        return item
    raise KeyError(f"no item {item_id!r} in {catalog.get_self_href()}")


def grd_catalog(src_catalog: Path, item_id: str, out: Path, n_gcps: int = 11) -> Path:
    """A ``sentinel-1-grd`` copy of the ``sentinel-1-rtc`` item ``item_id`` of ``src_catalog``, in radar geometry.

    Writes ``out/sentinel-1-grd/<grd id>/vv.tif`` and ``vh.tif``: the RTC arrays (linear power) flipped in both
    axes, as in an ascending-pass GRD, with no geotransform, georeferenced only by ``n_gcps`` x ``n_gcps`` GCPs
    in lon/lat (see :func:`grd_gcps`). The item keeps the RTC item's datetime, geometry, sar/sat and platform fields;
    its assets carry ``proj:shape`` but no transform.
    """
    out = Path(out).resolve()
    src = pystac.Catalog.from_file(str(Path(src_catalog).resolve()))
    rtc = _find_item(src, item_id)
    if rtc.collection_id != S1_RTC_COLLECTION:
        raise ValueError(f"item {item_id!r} is in {rtc.collection_id!r}, not {S1_RTC_COLLECTION!r}")
    grd_id = rtc.id.removesuffix("_rtc") if rtc.id.endswith("_rtc") else f"{rtc.id}_grd"
    item = pystac.Item(
        id=grd_id,
        geometry=rtc.geometry,
        bbox=rtc.bbox,
        datetime=rtc.datetime,
        properties={},
        collection=S1_GRD_COLLECTION,
    )
    item.common_metadata.providers = _providers("GRD-like radar-geometry copy of a demo RTC item (synthetic)")
    keep = ("platform", "constellation", "instruments")
    for k, v in rtc.properties.items():
        if k in keep or k.startswith(("sar:", "sat:")):
            item.properties[k] = v
    for uri in rtc.stac_extensions:
        if "/sar/" in uri or "/sat/" in uri:
            item.stac_extensions.append(uri)
    for key in ("vv", "vh"):
        asset = rtc.assets[key]
        with rasterio.open(asset.get_absolute_href()) as rsrc:
            data = rsrc.read(1)
            nodata, map_transform, map_crs = rsrc.nodata, rsrc.transform, rsrc.crs
        radar = np.ascontiguousarray(data[::-1, ::-1])
        gcps = grd_gcps(map_transform, map_crs, data.shape, n=n_gcps)
        path = out / S1_GRD_COLLECTION / grd_id / f"{key}.tif"  # next to the item JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=radar.shape[1],
            height=radar.shape[0],
            count=1,
            dtype=radar.dtype,
            nodata=nodata,
            gcps=gcps,
            crs=GCP_CRS,
            compress="deflate",
        ) as dst:
            dst.write(radar, 1)
            dst.set_band_description(1, key.upper())
        grd_asset = pystac.Asset(
            href=str(path),
            media_type=pystac.MediaType.GEOTIFF,
            title=f"{key.upper()}: backscatter in radar geometry (linear power)",
            roles=["data"],
        )
        item.add_asset(key, grd_asset)
        ProjectionExtension.ext(grd_asset, add_if_missing=True).shape = list(radar.shape)
        RasterExtension.ext(grd_asset, add_if_missing=True).bands = [
            RasterBand.create(nodata=nodata, data_type=DataType.FLOAT32)
        ]
    item.properties["skysense:rtc_item"] = rtc.id
    catalog = pystac.Catalog(
        id="sentinel-1-grd-demo",
        title="Sentinel-1 GRD (demo, radar geometry)",
        description=f"A GRD-like radar-geometry copy of demo RTC item {rtc.id}, georeferenced by GCPs only.",
    )
    catalog.add_child(
        _collection(
            S1_GRD_COLLECTION,
            "Sentinel-1 GRD (demo)",
            "Synthetic Sentinel-1 GRD, linear power, radar geometry (GCPs).",
            [item],
            "CC0-1.0",
        )
    )
    return _save(catalog, out)

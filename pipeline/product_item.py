"""The STAC item of a product COG: where it is, what its pixels mean, and what made it.

One item per product COG (``pipeline.mosaic.mosaic_tiles``), with:

- geometry / bbox in lon/lat from the COG's bounds (edges densified: a UTM or EPSG:3035 rectangle is not a
  lon/lat rectangle);
- the projection extension (``proj:code``, ``proj:shape``, ``proj:transform``, ``proj:bbox``) and ``gsd``;
- asset ``data`` (the COG, roles ``data``) with the raster extension (nodata, data type, resolution per band)
  and, for class maps, the classification extension (``classification:classes``: value, name, title,
  colour hint); asset ``thumbnail`` (the quicklook PNG) when given;
- provenance (model preset, checkpoint sha256, input item ids, cube, dates, ...) as ``skysense:*``
  properties, and the processing extension's fields where the provenance gives them.

The processing extension has no pystac class: its fields are set by name with its schema URI.
:func:`write_item` writes the JSON atomically with asset hrefs relative to the item file, so a product folder
can be moved or uploaded as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import rasterio.warp
import shapely
import shapely.geometry
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension

__all__ = ["PROCESSING_SCHEMA", "add_raster_asset", "product_item", "public_provenance", "write_item"]

PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
# Provenance keys that are processing-extension fields (``processing:<key>``); every provenance key is also
# kept as ``skysense:<key>``.
_PROCESSING_KEYS = ("lineage", "level", "facility", "software", "version", "expression", "datetime")
# classification v2 class names are identifiers; the human name goes to ``title`` when it is not one.
_NAME_RE = re.compile(r"[^0-9A-Za-z_-]+")


def _jsonable(v: Any) -> Any:
    """Provenance values as JSON: dates as ISO 8601, paths as strings, numpy scalars as Python numbers."""
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).isoformat().replace("+00:00", "Z")
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    return v


def _public(v: Any) -> Any:
    """A provenance value as it may leave this machine: a local absolute path becomes its last component (the
    file's name: ``model.safetensors``, ``cube.zarr``); the sha256 fields say which file it was. A published item
    must not tell the world the layout of the machine that made it."""
    if isinstance(v, (str, Path)) and "://" not in str(v) and os.path.isabs(str(v)):
        return Path(v).name
    return v


def public_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """``provenance`` as it may be published (JSON values, local absolute paths cut to their file names), for
    metadata written outside a STAC item (the embedding field's attributes)."""
    return {k: _jsonable(_public(v)) for k, v in provenance.items()}


def _utc(d: datetime | None) -> datetime | None:
    if d is None:
        return None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def _footprint_lonlat(src: rasterio.DatasetReader) -> shapely.Polygon:
    """The raster's bounds as a lon/lat polygon, 16 points per edge."""
    x0, y0, x1, y1 = src.bounds
    box = shapely.segmentize(shapely.geometry.box(x0, y0, x1, y1), max(x1 - x0, y1 - y0) / 16)
    xs, ys = np.asarray(box.exterior.coords).T
    lon, lat = rasterio.warp.transform(src.crs, "EPSG:4326", xs, ys)
    return shapely.Polygon(np.column_stack([lon, lat]))


def _hex(rgba) -> str:
    return "".join(f"{int(c):02X}" for c in rgba[:3])


def product_item(
    cog: str | Path,
    *,
    item_id: str,
    start: datetime | None,
    end: datetime | None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    colormap: Mapping | None = None,
    provenance: Mapping[str, Any] | None = None,
    quicklook: str | Path | None = None,
    collection: str | None = None,
    properties: Mapping[str, Any] | None = None,
    collection_href: str | None = None,
) -> pystac.Item:
    """A pystac Item describing the product COG ``cog`` (asset hrefs absolute; :func:`write_item` makes them
    relative to the item file).

    ``start``/``end``: the period the product describes (UTC when naive); both given and different: a range
    (``start_datetime``/``end_datetime``), one given or equal: ``datetime``; none: ``datetime`` = now.
    ``class_names`` ({value: name} or a list indexed by value; default the COG's ``class_names`` tag) and
    ``colormap`` ({value: RGB(A)}; default the COG's colour table) give ``classification:classes`` on the data
    asset (a name that is not an identifier is kept as the class ``title``, its identifier form as ``name``).
    ``provenance``: {key: value}, each kept as the property ``skysense:<key>`` (e.g. ``model_preset``,
    ``checkpoint_sha256``, ``input_items``, ``cube``, ``dates``); ``lineage``, ``level``, ``facility``,
    ``software`` ({name: version}), ``version``, ``expression`` and ``datetime`` also become the processing
    extension's ``processing:*`` fields. ``quicklook``: PNG for the ``thumbnail`` asset. ``collection``: the
    collection id; ``collection_href``: where that collection's JSON is (relative to the item file or a URL),
    written as the ``collection`` link that STAC 1.1 asks for beside the id (without it the item validates
    only once a publisher links it). ``properties``: extra item properties (they win over the computed ones).
    """
    cog = Path(cog)
    with rasterio.open(cog) as src:
        if src.crs is None:
            raise ValueError(f"product {cog} has no CRS")
        crs = src.crs
        epsg = crs.to_epsg()
        footprint = _footprint_lonlat(src)
        shape, transform, native_bbox = [src.height, src.width], list(src.transform)[:6], list(src.bounds)
        dtypes, nodata, count = src.dtypes, src.nodata, src.count
        descriptions = src.descriptions
        res = abs(src.transform.a)
        tag_names = src.tags().get("class_names")
        cmap = None
        if colormap is None and count == 1 and src.colorinterp[0].name == "palette":
            cmap = src.colormap(1)
    if class_names is None and tag_names:
        class_names = json.loads(tag_names)
    if class_names is not None and not isinstance(class_names, Mapping):
        class_names = dict(enumerate(class_names))  # a list of names, indexed by value
    colormap = {int(k): v for k, v in (colormap if colormap is not None else cmap or {}).items()}

    start, end = _utc(start), _utc(end)
    if start and end and start != end:
        dt, period = None, {"start_datetime": start, "end_datetime": end}
    else:
        dt, period = start or end or datetime.now(timezone.utc), {}
    item = pystac.Item(
        id=item_id,
        geometry=shapely.geometry.mapping(footprint),
        bbox=list(footprint.bounds),
        datetime=dt,
        properties={},
        collection=collection,
        **period,
    )
    item.common_metadata.created = datetime.now(timezone.utc)
    if collection is not None and collection_href is not None:
        item.add_link(pystac.Link(pystac.RelType.COLLECTION, collection_href, media_type=pystac.MediaType.JSON))

    proj = ProjectionExtension.ext(item, add_if_missing=True)
    if epsg is not None:
        proj.epsg = epsg
    else:
        proj.code = None
        proj.wkt2 = crs.to_wkt()
    proj.shape = shape
    proj.transform = transform
    proj.bbox = native_bbox
    if crs.is_projected and crs.linear_units in ("metre", "meter"):
        item.common_metadata.gsd = res

    asset = pystac.Asset(
        href=str(cog.resolve()),
        media_type=pystac.MediaType.COG,
        roles=["data"],
        title="class map" if class_names else "product",
    )
    item.add_asset("data", asset)
    RasterExtension.add_to(item)
    bands = []
    for b in range(count):
        nd = nodata
        if nd is not None and isinstance(nd, float) and math.isnan(nd):
            nd = NoDataStrings.NAN
        band = RasterBand.create(
            nodata=nd if nd is None or isinstance(nd, NoDataStrings) else (int(nd) if float(nd).is_integer() else nd),
            data_type=DataType(dtypes[b]),
            spatial_resolution=res,
        )
        if descriptions[b]:
            band.properties["name"] = descriptions[b]
        bands.append(band)
    RasterExtension.ext(asset).bands = bands

    if class_names:
        classes = []
        for value, name in sorted((int(v), str(n)) for v, n in class_names.items()):
            ident = _NAME_RE.sub("_", name).strip("_") or f"class_{value}"
            c = Classification.create(value=value, name=ident, title=name if ident != name else None)
            if colormap and value in colormap:
                c.color_hint = _hex(colormap[value])
            classes.append(c)
        ClassificationExtension.ext(asset, add_if_missing=True).classes = classes

    if quicklook is not None:
        item.add_asset(
            "thumbnail",
            pystac.Asset(
                href=str(Path(quicklook).resolve()),
                media_type=pystac.MediaType.PNG,
                roles=["thumbnail"],
                title="quicklook",
            ),
        )

    if provenance:
        for k, v in provenance.items():
            item.properties[f"skysense:{k}"] = _jsonable(_public(v))
        processing = {f"processing:{k}": _jsonable(provenance[k]) for k in _PROCESSING_KEYS if k in provenance}
        if processing:
            item.properties.update(processing)
            if PROCESSING_SCHEMA not in item.stac_extensions:
                item.stac_extensions.append(PROCESSING_SCHEMA)
    if properties:
        item.properties.update(_jsonable(dict(properties)))
    return item


def add_raster_asset(item: pystac.Item, key: str, cog: str | Path, *, roles: Sequence[str], title: str,
                     nodata: float | None = None, unit: str | None = None) -> pystac.Asset:
    """Add a second raster of the product (a confidence band, a baseline) as the asset ``key`` of ``item``, with
    the raster extension's band description read from the file (data type, nodata, resolution, ``unit``)."""
    cog = Path(cog)
    with rasterio.open(cog) as src:
        dtypes, nd, res = src.dtypes, src.nodata if nodata is None else nodata, abs(src.transform.a)
    asset = pystac.Asset(href=str(cog.resolve()), media_type=pystac.MediaType.COG, roles=list(roles), title=title)
    item.add_asset(key, asset)
    bands = []
    for dt in dtypes:
        band = RasterBand.create(nodata=None if nd is None else (int(nd) if float(nd).is_integer() else nd),
                                 data_type=DataType(dt), spatial_resolution=res, unit=unit)
        bands.append(band)
    RasterExtension.ext(asset).bands = bands
    return asset


def write_item(item: pystac.Item, path: str | Path) -> Path:
    """Write ``item`` as JSON to ``path`` atomically (temporary name, then rename), local asset hrefs relative
    to the item file, no self link (the file can move with its assets). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    item = item.clone()
    item.set_self_href(str(path.resolve()))
    item.make_asset_hrefs_relative()
    doc = item.to_dict(include_self_link=False, transform_hrefs=False)
    text = json.dumps(doc, indent=2, allow_nan=False)  # NaN is not JSON: nodata NaN is the string "nan"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


VRT_MEDIA_TYPE = "application/x-gdal-vrt"  # [ours] GDAL has no registered media type for VRT


def write_parts_collection(parts: Sequence[pystac.Item], vrt: str | Path, path: str | Path, *, collection_id: str,
                           description: str, quicklook: str | Path | None = None,
                           report: str | Path | None = None) -> Path:
    """A product made of several COGs (``pipeline.mosaic.mosaic_parts``) as a STAC Collection at ``path``: one
    item per part (``product_item`` of each part COG, written beside its COG as ``<part>.json``), ``item``
    links from the collection, the VRT that joins the parts as its ``index`` asset (``data`` role too: GDAL and
    QGIS open it as one raster), ``report`` (an HTML run report) as its ``report`` asset. Local hrefs are
    relative, so the product directory can move. Returns the path."""
    path, vrt = Path(path), Path(vrt)
    if not parts:
        raise ValueError("a product collection needs at least one part")
    starts = [p.common_metadata.start_datetime or p.datetime for p in parts]
    ends = [p.common_metadata.end_datetime or p.datetime for p in parts]
    bboxes = [p.bbox for p in parts]
    bbox = [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes),
            max(b[3] for b in bboxes)]
    coll = pystac.Collection(
        id=collection_id, description=description, license="other",
        extent=pystac.Extent(pystac.SpatialExtent([bbox]),
                             pystac.TemporalExtent([[min(d for d in starts if d), max(d for d in ends if d)]])),
    )
    coll.add_asset("index", pystac.Asset(href=str(vrt.resolve()), media_type=VRT_MEDIA_TYPE, roles=["data", "index"],
                                         title="all parts as one raster (GDAL VRT)"))
    if quicklook is not None:
        coll.add_asset("thumbnail", pystac.Asset(href=str(Path(quicklook).resolve()), media_type=pystac.MediaType.PNG,
                                                 roles=["thumbnail"]))
    if report is not None:
        coll.add_asset("report", pystac.Asset(href=str(Path(report).resolve()), media_type=pystac.MediaType.HTML,
                                              roles=["overview", "metadata"], title="run report"))
    coll.set_self_href(str(path.resolve()))
    for item in parts:
        data = Path(item.assets["data"].href)
        item_path = data.with_suffix(".json")
        item.collection_id = collection_id
        item.add_link(pystac.Link(pystac.RelType.COLLECTION, os.path.relpath(path.resolve(), item_path.parent),
                                  media_type=pystac.MediaType.JSON))
        write_item(item, item_path)
        coll.add_link(pystac.Link(pystac.RelType.ITEM, os.path.relpath(item_path.resolve(), path.parent),
                                  media_type=pystac.MediaType.GEOJSON, title=item.id))
    coll.make_all_asset_hrefs_relative()
    doc = coll.to_dict(include_self_link=False, transform_hrefs=False)
    for a in doc.get("assets", {}).values():  # relative to the collection file
        if Path(a["href"]).is_absolute():
            a["href"] = os.path.relpath(a["href"], path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

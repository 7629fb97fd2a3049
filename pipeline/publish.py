"""Publishing product versions: a static STAC collection on disk, and items POSTed to a STAC API that has the
Transactions extension (stac-fastapi-pgstac with ``ENABLE_TRANSACTIONS_EXTENSIONS=true``).

The static collection (``write_static_collection``) is rewritten whole from the item files it is given, under a
temporary name and then renamed, so a reader never sees half a catalog and a killed writer leaves the previous
one. Items keep their own files (next to their COGs); the collection links to them relatively, so the whole
product directory can move or be served as it is (STAC Browser, QGIS's STAC plugin, pystac).

``publish_item`` is idempotent: the collection is created when the API lacks it, an item id that exists is
replaced (PUT) instead of failing, and every HTTP failure raises :class:`PublishError` with the status and the
server's message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pystac


class PublishError(RuntimeError):
    """The STAC API refused or could not be reached."""


def product_collection(collection_id: str, title: str, description: str,
                       items: Sequence[pystac.Item] = ()) -> pystac.Collection:
    """A collection whose extent covers ``items`` (the whole globe and an open interval when there are none)."""
    bboxes = [it.bbox for it in items if it.bbox]
    if bboxes:
        bbox = [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes),
                max(b[3] for b in bboxes)]
    else:
        bbox = [-180.0, -90.0, 180.0, 90.0]
    times = []
    for it in items:
        cm = it.common_metadata
        times += [t for t in (it.datetime, cm.start_datetime, cm.end_datetime) if t is not None]
    interval = [min(times), max(times)] if times else [None, None]
    return pystac.Collection(
        id=collection_id,
        title=title,
        description=description,
        extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([interval])),
        license="proprietary",
        extra_fields={"skysense:updated": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )


def write_static_collection(path: str | Path, collection_id: str, title: str, description: str,
                            item_files: Sequence[str | Path]) -> Path:
    """Write ``path`` (``collection.json``) listing ``item_files`` (item JSON files; their hrefs stay theirs)
    as ``item`` links relative to it, atomically. Returns the path."""
    path = Path(path).resolve()
    items = [pystac.Item.from_file(str(f)) for f in item_files]
    col = product_collection(collection_id, title, description, items)
    col.set_self_href(str(path))
    for f, it in zip(item_files, items, strict=True):
        rel = os.path.relpath(Path(f).resolve(), path.parent)
        col.add_link(pystac.Link("item", rel, media_type=pystac.MediaType.JSON, title=it.id))
    doc = col.to_dict(include_self_link=False, transform_hrefs=False)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


PUBLISH_TOKEN_ENV = "SKYSENSE_PUBLISH_TOKEN"  # sent as "Authorization: Bearer <token>"
PUBLISH_USER_ENV, PUBLISH_PASSWORD_ENV = "SKYSENSE_PUBLISH_USER", "SKYSENSE_PUBLISH_PASSWORD"  # HTTP basic auth


def publish_auth() -> dict[str, Any]:
    """``requests`` keyword arguments that authenticate to the STAC API being published to, from the
    environment (never from a flag: command lines are visible to every user of the machine): a bearer token
    in ``SKYSENSE_PUBLISH_TOKEN``, or basic auth from ``SKYSENSE_PUBLISH_USER`` / ``SKYSENSE_PUBLISH_PASSWORD``;
    nothing when neither is set."""
    token = os.environ.get(PUBLISH_TOKEN_ENV)
    if token:
        return {"headers": {"Authorization": f"Bearer {token}"}}
    user = os.environ.get(PUBLISH_USER_ENV)
    if user:
        return {"auth": (user, os.environ.get(PUBLISH_PASSWORD_ENV, ""))}
    return {}


def _request(method: str, url: str, what: str, timeout: float, **kw):
    import requests

    try:
        return requests.request(method, url, timeout=timeout, **publish_auth(), **kw)
    except requests.RequestException as e:
        raise PublishError(f"{what}: {method} {url} failed: {type(e).__name__}: {e}") from None


def publish_item(api_url: str, item: dict[str, Any], collection: dict[str, Any], timeout: float = 30.0) -> str:
    """POST ``item`` (a STAC item dict with absolute asset hrefs) to ``api_url``; create ``collection`` (a
    collection dict) first when the API does not have it; replace an existing item of the same id. Returns
    "created" or "replaced"; raises :class:`PublishError`."""
    base = api_url.rstrip("/")
    cid = collection["id"]
    if item.get("collection") != cid:
        raise ValueError(f"item {item.get('id')} names collection {item.get('collection')!r}, not {cid!r}")
    r = _request("GET", f"{base}/collections/{cid}", "reading the collection", timeout)
    if r.status_code == 404:
        r = _request("POST", f"{base}/collections", "creating the collection", timeout, json=collection)
        if r.status_code not in (200, 201, 409):  # 409: created meanwhile by another publisher
            raise PublishError(_refused("creating collection " + cid, base, r))
    elif r.status_code != 200:
        raise PublishError(_refused("reading collection " + cid, base, r))
    r = _request("POST", f"{base}/collections/{cid}/items", "adding the item", timeout, json=item)
    if r.status_code in (200, 201):
        return "created"
    if r.status_code == 409:
        r = _request("PUT", f"{base}/collections/{cid}/items/{item['id']}", "replacing the item", timeout, json=item)
        if r.status_code in (200, 201):
            return "replaced"
    raise PublishError(_refused(f"adding item {item['id']}", base, r))


def _refused(what: str, base: str, r) -> str:
    hint = ""
    if r.status_code in (404, 405):
        hint = (" (does the API have the Transactions extension on? stac-fastapi-pgstac: "
                "ENABLE_TRANSACTIONS_EXTENSIONS=true)")
    elif r.status_code in (401, 403):
        hint = (f" (set {PUBLISH_TOKEN_ENV}, or {PUBLISH_USER_ENV} and {PUBLISH_PASSWORD_ENV}, to the API's "
                "credentials)")
    return f"{what} at {base}: HTTP {r.status_code}: {r.text[:300]}{hint}"

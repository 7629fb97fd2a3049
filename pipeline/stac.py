"""STAC search: one interface, two back ends that return the same items for the same query.

- :class:`StacApiSource`: any STAC API (Planetary Computer, Earth Search, pgstac ...) through pystac-client,
  with paging, retries with backoff on transient errors (5xx, timeouts, dropped connections) and no retry
  on a 4xx, which is reported with the server's message.
- :class:`StaticCatalogSource`: a local (or HTTP-served) static catalog read with pystac and searched
  in-process. pystac-client cannot search a static catalog (it raises ``DoesNotConformTo``), so the filters
  are evaluated here with the API's semantics: collections; bbox / intersects on the item geometry;
  datetime intervals expanded exactly as pystac-client expands them; ``query`` operators; CQL2 ``filter``
  (evaluated by the ``cql2`` library); results ordered like pgstac (datetime, then id, both descending).

Use :func:`open_source` to get the right back end for a path or URL, then :func:`search`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pystac
import requests
import shapely.geometry
from urllib3.util.retry import Retry

from pipeline.grid import BBOX_HELP, aoi_argv, parse_bbox

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100


class StacSearchError(RuntimeError):
    """Base class of every search failure; the message says what and where."""


class CatalogNotFoundError(StacSearchError):
    pass


class CatalogFormatError(StacSearchError):
    pass


class StacApiError(StacSearchError):
    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class CollectionNotFoundError(StacSearchError):
    pass


class EmptySearchError(StacSearchError):
    pass


@dataclass(frozen=True)
class SearchQuery:
    """A STAC item search. ``bbox`` is (min lon, min lat, max lon, max lat) in WGS84; ``intersects`` a GeoJSON
    geometry; ``datetime`` an RFC 3339 instant or interval (``"2024-01-01/2024-03-31"``, ``"2024-06/.."``,
    ``"2024"``); ``query`` the STAC query extension (``{"eo:cloud_cover": {"lt": 20}}``); ``filter`` CQL2-JSON.
    ``limit`` is the page size, ``max_items`` the total cap."""

    collections: tuple[str, ...] | None = None
    bbox: tuple[float, float, float, float] | None = None
    intersects: Mapping[str, Any] | None = None
    datetime: str | None = None
    query: Mapping[str, Any] | None = None
    filter: Mapping[str, Any] | None = None
    limit: int = DEFAULT_PAGE_SIZE
    max_items: int | None = None

    def __post_init__(self) -> None:
        if self.bbox is not None:
            if len(self.bbox) != 4:
                raise ValueError(f"bbox needs 4 numbers (min lon, min lat, max lon, max lat), got {self.bbox}")
            x0, y0, x1, y1 = self.bbox
            if not (x0 <= x1 and y0 <= y1 and -180 <= x0 and x1 <= 180 and -90 <= y0 and y1 <= 90):
                raise ValueError(f"bbox {self.bbox} is not (min lon, min lat, max lon, max lat) in degrees")
        if self.bbox is not None and self.intersects is not None:
            raise ValueError("give bbox or intersects, not both")
        if self.limit < 1:
            raise ValueError(f"limit (page size) must be >= 1, got {self.limit}")

    def describe(self) -> str:
        parts = []
        for name in ("collections", "bbox", "datetime", "query", "filter", "max_items"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={list(v) if isinstance(v, tuple) else v}")
        if self.intersects is not None:
            parts.append(f"intersects={self.intersects.get('type')}")
        return ", ".join(parts) or "(no filters)"


class StacSource(Protocol):
    href: str
    provider: str

    def collection_ids(self) -> list[str]: ...

    def search(self, query: SearchQuery) -> list[pystac.Item]: ...


def format_datetime(value: str | datetime | None) -> tuple[datetime | None, datetime | None] | None:
    """Expand a STAC datetime parameter to an inclusive (start, end) in UTC, None for an open end.

    The expansion is pystac-client's own (``"2024-05"`` is the whole month, a date the whole day), so both
    back ends read a query identically. pystac-client keeps it on ItemSearch (private, but it uses ``self``
    only for its static helpers), so an instance is made without ``__init__``.
    """
    if value is None:
        return None
    from pystac_client.item_search import ItemSearch

    text = ItemSearch.__new__(ItemSearch)._format_datetime(value)
    if text is None:
        return None
    start_s, _, end_s = text.partition("/")
    if not end_s:
        end_s = start_s
    start, end = _parse_instant(start_s), _parse_instant(end_s)
    if start is not None and end is not None and end < start:
        raise ValueError(f"datetime interval {value!r} ends before it starts")
    return start, end


def _parse_instant(s: str) -> datetime | None:
    if s in ("..", ""):
        return None
    dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _item_interval(item: pystac.Item) -> tuple[datetime, datetime] | None:
    start = item.common_metadata.start_datetime or item.datetime
    end = item.common_metadata.end_datetime or item.datetime
    if start is None or end is None:
        return None
    return start, end


_QUERY_OPS = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "startsWith": lambda a, b: isinstance(a, str) and a.startswith(b),
    "endsWith": lambda a, b: isinstance(a, str) and a.endswith(b),
    "contains": lambda a, b: isinstance(a, str) and b in a,
    "in": lambda a, b: a in b,
}


def _check_query(query: Mapping[str, Any]) -> None:
    """Reject unknown operators up front, as the API does (HTTP 400), whatever the items hold."""
    for prop, ops in query.items():
        if not isinstance(ops, Mapping):
            raise ValueError(f"query on {prop!r} must map operators to values, got {ops!r}")
        for op in ops:
            if op not in _QUERY_OPS:
                raise ValueError(f"unsupported query operator {op!r} on {prop!r}; supported: {', '.join(_QUERY_OPS)}")


def _matches_query(properties: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    for prop, ops in query.items():
        if prop not in properties:
            return False
        value = properties[prop]
        for op, operand in ops.items():
            try:
                if not _QUERY_OPS[op](value, operand):
                    return False
            except TypeError:
                return False
    return True


def _sort_key(item: pystac.Item) -> tuple[str, str]:
    # pgstac's default order: datetime descending, then id descending.
    iv = _item_interval(item)
    return (iv[0].isoformat() if iv else "", item.id)


@dataclass
class _IndexedItem:
    item: pystac.Item
    collection: str | None
    geometry: Any
    interval: tuple[datetime, datetime] | None


class StaticCatalogSource:
    """A static STAC catalog (``catalog.json`` or a directory holding one), searched in-process.

    The catalog is walked once (child and item links, recursively) and indexed in memory; every item's
    asset hrefs are made absolute so items from both back ends can be loaded the same way.
    """

    def __init__(self, href: str | os.PathLike, provider: str = "auto", allow: Sequence[str] = ()):
        from pipeline.hrefs import HrefPolicy

        href = str(href)
        if not href.startswith(("http://", "https://")):
            path = Path(href)
            if path.is_dir():
                path = path / "catalog.json"
            if not path.exists():
                raise CatalogNotFoundError(f"no STAC catalog at {href!r}: {path} does not exist")
            href = str(path.resolve())
        self.href = href
        self.provider = provider
        self.policy = HrefPolicy.for_catalog(href, allow)  # child and item links stay inside it
        self._index: list[_IndexedItem] | None = None
        self.root = self._read(href, expect=(pystac.Catalog, pystac.Collection))

    @staticmethod
    def _read(href: str, expect: tuple[type, ...]) -> Any:
        try:
            obj = pystac.read_file(href)
        except FileNotFoundError as e:
            raise CatalogNotFoundError(f"STAC file {href!r} does not exist (linked from the catalog)") from e
        except json.JSONDecodeError as e:
            raise CatalogFormatError(f"STAC file {href!r} is not valid JSON: {e}") from e
        except (pystac.STACError, pystac.STACTypeError, KeyError, TypeError, ValueError) as e:
            raise CatalogFormatError(f"STAC file {href!r} is not a valid STAC object: {type(e).__name__}: {e}") from e
        if not isinstance(obj, expect):
            raise CatalogFormatError(
                f"STAC file {href!r} is a {type(obj).__name__}, expected {' or '.join(t.__name__ for t in expect)}"
            )
        return obj

    def _walk(self, node: pystac.Catalog) -> Iterator[pystac.Item]:
        for link in node.links:
            if link.rel not in ("child", "item"):
                continue
            href = link.get_absolute_href()
            if href is None:
                raise CatalogFormatError(f"{node.get_self_href()}: cannot resolve link {link.href!r}")
            from pipeline.hrefs import HrefRefused

            try:
                self.policy.check(href, f"{link.rel} link of {node.get_self_href()}")
            except HrefRefused as e:
                raise CatalogFormatError(str(e)) from None
            if link.rel == "child":
                yield from self._walk(self._read(href, expect=(pystac.Catalog, pystac.Collection)))
            else:
                item = self._read(href, expect=(pystac.Item,))
                if item.collection_id is None and isinstance(node, pystac.Collection):
                    item.collection_id = node.id
                item.make_asset_hrefs_absolute()
                yield item

    def _items(self) -> list[_IndexedItem]:
        if self._index is None:
            index = []
            for item in self._walk(self.root):
                geom = shapely.geometry.shape(item.geometry) if item.geometry else None
                index.append(_IndexedItem(item, item.collection_id, geom, _item_interval(item)))
            self._index = index
        return self._index

    def collection_ids(self) -> list[str]:
        ids = {c.id for c in self._collections(self.root)}
        ids.update(i.collection for i in self._items() if i.collection)
        return sorted(ids)

    def _collections(self, node: pystac.Catalog) -> Iterator[pystac.Collection]:
        if isinstance(node, pystac.Collection):
            yield node
        for link in node.get_links("child"):
            yield from self._collections(self._read(link.get_absolute_href(), (pystac.Catalog, pystac.Collection)))

    def search(self, query: SearchQuery) -> list[pystac.Item]:
        if query.query:
            _check_query(query.query)
        items = self._items()
        if query.collections is not None:
            known = self.collection_ids()
            _check_collections(query.collections, known, self.href)
            wanted = set(query.collections)
            items = [i for i in items if i.collection in wanted]
        region = None
        if query.bbox is not None:
            region = shapely.geometry.box(*query.bbox)
        elif query.intersects is not None:
            region = shapely.geometry.shape(query.intersects)
        if region is not None:
            items = [i for i in items if i.geometry is not None and i.geometry.intersects(region)]
        span = format_datetime(query.datetime)
        if span is not None:
            q0, q1 = span
            items = [
                i
                for i in items
                if i.interval is not None
                and (q1 is None or i.interval[0] <= q1)
                and (q0 is None or i.interval[1] >= q0)
            ]
        if query.query:
            items = [i for i in items if _matches_query(i.item.properties, query.query)]
        if query.filter:
            import cql2

            expr = cql2.Expr(dict(query.filter))
            items = [i for i in items if expr.matches(i.item.to_dict(include_self_link=False))]
        out = sorted((i.item for i in items), key=_sort_key, reverse=True)
        if query.max_items is not None:
            out = out[: query.max_items]
        return [it.clone() for it in out]


def _check_collections(requested: Iterable[str], known: Sequence[str], where: str) -> None:
    missing = [c for c in requested if c not in known]
    if missing:
        available = ", ".join(known) or "none"
        raise CollectionNotFoundError(
            f"collection(s) {', '.join(map(repr, missing))} not found in {where}; available: {available}"
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient API failures: HTTP 5xx and 429, connection errors and read timeouts.

    Any other 4xx is a client error and is reported at once. The wait before retry n is
    ``backoff_s * 2**(n-1)`` seconds (urllib3's rule: the first retry does not wait), capped at
    ``max_backoff_s``; a ``Retry-After`` header is respected.
    """

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    status_forcelist: tuple[int, ...] = (429, 500, 502, 503, 504)

    def to_urllib3(self) -> Retry:
        return Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            backoff_factor=self.backoff_s,
            backoff_max=self.max_backoff_s,
            status_forcelist=self.status_forcelist,
            allowed_methods=None,  # POST /search is a read: retry it too
            respect_retry_after_header=True,
            raise_on_status=True,
        )


class StacApiSource:
    """Any STAC API, through pystac-client."""

    def __init__(self, url: str, provider: str = "auto", retry: RetryPolicy = RetryPolicy(), headers=None):
        from pystac_client import Client
        from pystac_client.stac_api_io import StacApiIO

        self.href = url.rstrip("/")
        self.provider = provider
        self.retry = retry
        io = StacApiIO(headers=headers, timeout=retry.timeout_s, max_retries=retry.to_urllib3())
        self.client = self._call(lambda: Client.open(self.href, stac_io=io), "open the API landing page")
        # stac-fastapi >= 6 advertises item-search#sort as v1.1.0; pystac-client 0.9 matches only v1.0.*.
        self.client.add_conforms_to("SORT")
        self._collections: list[str] | None = None

    def _call(self, fn, what: str):
        from pystac_client.exceptions import APIError

        try:
            return fn()
        except APIError as e:
            code = getattr(e, "status_code", None)
            if code is None:  # pystac-client wraps urllib3's "Max retries exceeded" without a status
                raise StacApiError(
                    f"{self.href}: could not {what}: still failing after {self.retry.retries} retries: {str(e)[:500]}"
                ) from e
            kind = "client error, not retried" if 400 <= code < 500 else "server error"
            raise StacApiError(f"{self.href}: could not {what}: HTTP {code} ({kind}): {str(e)[:500]}", code) from e
        except requests.exceptions.RetryError as e:
            raise StacApiError(
                f"{self.href}: could not {what}: still failing after {self.retry.retries} retries: {e}"
            ) from e
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise StacApiError(
                f"{self.href}: could not {what}: unreachable after {self.retry.retries} retries: {e}"
            ) from e
        except (ValueError, KeyError, TypeError, pystac.STACError) as e:  # JSONDecodeError is a ValueError
            raise StacApiError(f"{self.href}: could not {what}: the answer is not STAC JSON ({type(e).__name__}: "
                               f"{str(e)[:200]}); is this the landing page of a STAC API?") from e

    def collection_ids(self) -> list[str]:
        if self._collections is None:
            self._collections = sorted(
                c.id for c in self._call(lambda: list(self.client.get_collections()), "list collections")
            )
        return self._collections

    def search(self, query: SearchQuery) -> list[pystac.Item]:
        if query.collections is not None:
            _check_collections(query.collections, self.collection_ids(), self.href)
        kwargs: dict[str, Any] = {"limit": query.limit, "max_items": query.max_items}
        for name in ("collections", "bbox", "intersects", "datetime", "query", "filter"):
            value = getattr(query, name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            if value is not None:
                kwargs[name] = value
        if query.filter is not None:
            kwargs["filter_lang"] = "cql2-json"
        return self._call(lambda: list(self.client.search(**kwargs).items()), f"search ({query.describe()})")


def open_source(href: str | os.PathLike, provider: str = "auto", retry: RetryPolicy = RetryPolicy(),
                allow: Sequence[str] = ()) -> StacSource:
    """The search back end for ``href``: a STAC API URL, or a static catalog (path, directory, or URL of a
    ``.json`` file). ``allow``: directories or URL prefixes a static catalog's links may point to besides its own
    tree (``pipeline.hrefs``)."""
    s = str(href)
    if s.startswith(("http://", "https://")) and not s.endswith(".json"):
        return StacApiSource(s, provider=provider, retry=retry)
    return StaticCatalogSource(s, provider=provider, allow=allow)


def search(
    source: StacSource | str | os.PathLike,
    *,
    collections: Sequence[str] | None = None,
    bbox: Sequence[float] | None = None,
    intersects: Mapping[str, Any] | None = None,
    datetime: str | None = None,
    query: Mapping[str, Any] | None = None,
    filter: Mapping[str, Any] | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
    max_items: int | None = None,
    allow_empty: bool = False,
) -> list[pystac.Item]:
    """Search ``source`` (a :class:`StacSource`, or a path/URL given to :func:`open_source`).

    Returns items ordered by datetime then id, newest first, with absolute asset hrefs. An empty result raises
    :class:`EmptySearchError` naming the query, unless ``allow_empty``.
    """
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be at least 1 (or None for all), got {max_items}")
    if datetime is not None:
        format_datetime(datetime)  # an unreadable or inverted interval is an error, not an empty result
    src = open_source(source) if isinstance(source, (str, os.PathLike)) else source
    q = SearchQuery(
        collections=tuple(collections) if collections is not None else None,
        bbox=tuple(bbox) if bbox is not None else None,  # type: ignore[arg-type]
        intersects=intersects,
        datetime=datetime,
        query=query,
        filter=filter,
        limit=limit,
        max_items=max_items,
    )
    items = src.search(q)
    if not items and not allow_empty:
        raise EmptySearchError(f"no items in {src.href} match {q.describe()}")
    return items


@dataclass
class CollectionSummary:
    collection: str
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    cloud_cover: list[float] = field(default_factory=list)

    def line(self) -> str:
        span = f"{self.first:%Y-%m-%d} .. {self.last:%Y-%m-%d}" if self.first else "no dates"
        cc = ""
        if self.cloud_cover:
            cc = f", eo:cloud_cover {min(self.cloud_cover):.0f}-{max(self.cloud_cover):.0f}%"
        return f"{self.collection:<16} {self.count:>5} items, {span}{cc}"


def summarize(items: Iterable[pystac.Item]) -> list[CollectionSummary]:
    """Per-collection counts, date span and cloud-cover range of search results."""
    by: dict[str, CollectionSummary] = {}
    for it in items:
        s = by.setdefault(it.collection_id or "?", CollectionSummary(it.collection_id or "?"))
        s.count += 1
        iv = _item_interval(it)
        if iv:
            s.first = min(s.first, iv[0]) if s.first else iv[0]
            s.last = max(s.last, iv[1]) if s.last else iv[1]
        cc = it.properties.get("eo:cloud_cover")
        if cc is not None:
            s.cloud_cover.append(float(cc))
    return [by[k] for k in sorted(by)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.stac", description="Search a STAC API or a static catalog and summarise the items."
    )
    p.add_argument("catalog", help="STAC API URL, or path to a static catalog.json (or its directory)")
    p.add_argument("--collections", nargs="+")
    p.add_argument("--bbox", nargs="+", metavar="COORD", help=BBOX_HELP)
    p.add_argument("--datetime", help="RFC 3339 instant or interval, e.g. 2024-04-01/2024-09-30")
    p.add_argument("--max-cloud", type=float, help="keep items with eo:cloud_cover below this (percent)")
    p.add_argument("--max-items", type=int)
    p.add_argument("--ids", action="store_true", help="print item ids too")
    args = p.parse_args(aoi_argv(sys.argv[1:] if argv is None else argv))
    try:
        args.bbox = parse_bbox(args.bbox)
    except ValueError as e:
        p.error(str(e))
    if args.max_items is not None and args.max_items < 1:
        p.error(f"--max-items must be at least 1, got {args.max_items}")
    query = {"eo:cloud_cover": {"lt": args.max_cloud}} if args.max_cloud is not None else None
    try:
        items = search(
            args.catalog,
            collections=args.collections,
            bbox=args.bbox,
            datetime=args.datetime,
            query=query,
            max_items=args.max_items,
        )
    except (StacSearchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in summarize(items):
        print(s.line())
    if args.ids:
        for it in items:
            print(f"  {it.collection_id}  {it.id}")
    print(f"{len(items)} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())

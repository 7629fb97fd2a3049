#!/usr/bin/env python3
"""Convert a local static STAC catalog (pystac layout) into pgstac ndjson.

    python3 catalog_to_ndjson.py CATALOG_JSON OUTDIR

Walks the ``child`` and ``item`` links of CATALOG_JSON recursively and writes

* ``OUTDIR/collections.ndjson`` - one collection per line
* ``OUTDIR/items.ndjson``       - one item per line, each carrying ``collection``

ready for ``pypgstac load collections|items``. Every relative href (assets and
remaining links) is resolved against the location of the file it appears in, so
items served by the API are usable without a self link. Structural links
(self/root/parent/child/item/collection) are dropped: the API regenerates them.

Standard library only, so it runs in the project venv or the server venv.
"""

from __future__ import annotations

import json
import os
import sys
from urllib.parse import unquote, urlsplit

STRUCTURAL_RELS = {"self", "root", "parent", "child", "item", "collection", "items"}


def _is_url(href: str) -> bool:
    scheme = urlsplit(href).scheme
    # a Windows drive letter ("C:") is not a scheme; everything longer is
    return len(scheme) > 1


def _local_path(href: str) -> str:
    """Local filesystem path for a plain path or a file:// URL."""
    if href.startswith("file://"):
        return unquote(urlsplit(href).path)
    if _is_url(href):
        raise ValueError(f"only local catalogs are supported, got {href!r}")
    return href


def resolve(href: str, base_file: str) -> str:
    """Make href absolute relative to the JSON file base_file (a local path)."""
    if _is_url(href) or os.path.isabs(href):
        return href
    return os.path.normpath(os.path.join(os.path.dirname(base_file), href))


def _clean_links(obj: dict, path: str) -> None:
    kept = []
    for link in obj.get("links", []) or []:
        if link.get("rel") in STRUCTURAL_RELS:
            continue
        link = dict(link)
        if "href" in link:
            link["href"] = resolve(link["href"], path)
        kept.append(link)
    obj["links"] = kept


def _absolutise_assets(obj: dict, path: str) -> None:
    for asset in (obj.get("assets") or {}).values():
        if isinstance(asset, dict) and "href" in asset:
            asset["href"] = resolve(asset["href"], path)


def convert(catalog: str) -> tuple[list[dict], list[dict]]:
    """Return (collections, items) found below the catalog file."""
    collections: dict[str, dict] = {}
    items: dict[tuple[str, str], dict] = {}
    seen: set[str] = set()
    # iterative DFS: (path, id of nearest ancestor collection)
    stack: list[tuple[str, str | None]] = [(os.path.abspath(_local_path(catalog)), None)]
    while stack:
        path, parent_coll = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        typ = obj.get("type")
        links = obj.get("links", []) or []
        if typ == "Feature":
            coll = obj.get("collection") or parent_coll
            if not coll:
                raise ValueError(f"item {obj.get('id')!r} ({path}) belongs to no collection; "
                                 "pgstac needs every item inside a collection")
            obj["collection"] = coll
            _absolutise_assets(obj, path)
            _clean_links(obj, path)
            items[(coll, obj["id"])] = obj
            continue
        if typ == "Collection":
            parent_coll = obj["id"]
        elif typ != "Catalog":
            raise ValueError(f"{path}: unexpected STAC type {typ!r}")
        # follow links before cleaning them (in file order)
        for link in reversed(links):
            if link.get("rel") in ("child", "item") and link.get("href"):
                href = resolve(_local_path(link["href"]), path)
                stack.append((os.path.abspath(href), parent_coll))
        if typ == "Collection":
            _absolutise_assets(obj, path)
            _clean_links(obj, path)
            collections[obj["id"]] = obj
    missing = {c for c, _ in items} - set(collections)
    if missing:
        raise ValueError(f"items reference collections not in the catalog: {sorted(missing)}")
    return list(collections.values()), list(items.values())


def _dump(obj: dict) -> str:
    # pypgstac's ndjson reader rewrites "\\\\" to "\\" in every raw line, which would
    # corrupt escaped backslashes; write them as \u005c instead (same JSON value).
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).replace("\\\\", "\\u005c")


def write_ndjson(catalog: str, outdir: str) -> tuple[int, int]:
    collections, items = convert(catalog)
    os.makedirs(outdir, exist_ok=True)
    for name, objs in (("collections", collections), ("items", items)):
        with open(os.path.join(outdir, f"{name}.ndjson"), "w", encoding="utf-8") as f:
            for o in objs:
                f.write(_dump(o) + "\n")
    return len(collections), len(items)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    n_c, n_i = write_ndjson(argv[0], argv[1])
    print(f"{n_c} collections, {n_i} items")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

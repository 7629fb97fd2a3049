"""Where a catalog may send the pipeline: the scheme and location policy for every href a catalog supplies
(child and item links of a static catalog, asset hrefs of the items an ingest reads).

A catalog is input written by someone else. Without a policy an item could make an ingest read
``file:///etc/passwd`` or another user's files as a band, or fetch ``http://127.0.0.1:…`` / a cloud metadata
endpoint from inside the cluster. By default (:meth:`HrefPolicy.for_catalog`):

- local paths and ``file://`` URLs only inside the static catalog's own directory tree (after resolving ``..``
  and symbolic links), and none at all for a catalog served by an API;
- ``http(s)`` anywhere except loopback, private, link-local and other internal addresses (``localhost``, IP
  literals in those ranges), unless it is the catalog's own origin;
- object stores (``s3://`` ...) only under the prefixes a provider profile names (``pipeline.providers``);
- nothing else.

``allow`` (``--allow-href``, repeatable) widens it: a directory (its tree) or a URL prefix. Host names are not
resolved (a public name that resolves to an internal address is not caught: run the cluster with egress rules
where that matters).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


class HrefRefused(ValueError):
    """An href outside the policy; the message names it and the flag that would allow it."""


LOCAL_SCHEMES = ("", "file")
WEB_SCHEMES = ("http", "https")


def _is_internal(host: str | None) -> bool:
    if not host:
        return True
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast or \
        ip.is_unspecified


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme.lower()}://{p.netloc.lower()}/"


def _local_path(href: str) -> str:
    p = urlsplit(href)
    path = unquote(p.path) if p.scheme.lower() == "file" else href
    return os.path.realpath(path)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class HrefPolicy:
    """``roots``: local directory trees (real paths); ``urls``: URL prefixes allowed even when internal (the
    catalog's origin, ``--allow-href`` URLs); ``object_stores``: allowed ``s3://`` (etc.) prefixes; ``owner``:
    whose directory ``roots[0]`` is, for the messages ("the catalog", "the support file")."""

    roots: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    object_stores: tuple[str, ...] = ()
    owner: str = "the catalog"

    @classmethod
    def for_catalog(cls, catalog: str | os.PathLike, allow: Sequence[str] = (), owner: str = "the catalog",
                    ) -> HrefPolicy:
        """The default policy of ``catalog`` (a static catalog path or URL, or a STAC API URL; or another input
        file that names files, ``owner`` saying what it is), widened by ``allow`` (directories or URL
        prefixes)."""
        from pipeline.providers import PROFILES

        catalog = str(catalog)
        roots, urls = [], []
        if urlsplit(catalog).scheme.lower() in WEB_SCHEMES:
            urls.append(_origin(catalog))
        else:
            path = _local_path(catalog)
            roots.append(path if os.path.isdir(path) else os.path.dirname(path))
        for a in allow:
            a = str(a)
            if urlsplit(a).scheme.lower() in LOCAL_SCHEMES:
                roots.append(_local_path(a))
            else:
                urls.append(a)
        stores = tuple(m for p in PROFILES.values() for m in p.link_markers if "://" in m
                       and urlsplit(m).scheme.lower() not in WEB_SCHEMES)
        return cls(tuple(roots), tuple(urls), stores, owner)

    def check(self, href: str, what: str = "href") -> None:
        """Raise :class:`HrefRefused` unless ``href`` is allowed (module docstring); ``what`` names it."""
        scheme = urlsplit(href).scheme.lower()
        hint = "pass --allow-href with its directory or URL prefix to read it"
        if len(scheme) == 1:  # a Windows drive letter is a local path
            scheme = ""
        if scheme in LOCAL_SCHEMES:
            path = _local_path(href)
            if not any(_inside(path, r) for r in self.roots):
                where = f"{self.owner}'s directory {self.roots[0]}" if self.roots else "no local directory (the " \
                    "catalog is a STAC API)"
                raise HrefRefused(f"{what} {href!r} is a local file outside {where}; {hint}")
            return
        if any(href.startswith(u) for u in self.urls):
            return
        if scheme in WEB_SCHEMES:
            if _is_internal(urlsplit(href).hostname):
                raise HrefRefused(f"{what} {href!r} points at an internal address (loopback, private or link-local);"
                                  f" {hint}")
            return
        if any(href.startswith(s) for s in self.object_stores):
            return
        raise HrefRefused(f"{what} {href!r}: scheme {scheme!r} is not allowed (local files in the catalog's tree, "
                          f"http(s), the object stores {list(self.object_stores)}); {hint}")


REMOTE_INPUT_SCHEMES = ("http", "https", "s3", "gs", "az", "abfs")  # what a typed input path may name beyond files


def check_user_input(path: str, what: str) -> None:
    """A path the user typed (``--labels``): local files are the user's own and open wherever they are, but a
    URL is held to the rest of the policy, so that no flag makes a job fetch from inside the cluster: http(s)
    only to public addresses (no loopback, private or link-local), object stores by their schemes (GDAL's
    ``/vsis3/``-style paths included), nothing else. Raises :class:`HrefRefused` naming ``what``."""
    p = str(path)
    if p.startswith("/vsi"):
        for prefix in ("/vsicurl/", "/vsicurl_streaming/"):  # GDAL's HTTP reader: the URL follows the prefix
            if p.startswith(prefix):
                check_user_input(p[len(prefix):], what)
        return
    scheme = urlsplit(p).scheme.lower()
    if len(scheme) <= 1 or scheme == "file":  # a local path (a Windows drive letter too)
        return
    if scheme not in REMOTE_INPUT_SCHEMES:
        raise HrefRefused(f"{what} {p!r}: scheme {scheme!r} is not allowed (files, http(s), "
                          f"{', '.join(s for s in REMOTE_INPUT_SCHEMES if not s.startswith('http'))})")
    if scheme in WEB_SCHEMES and _is_internal(urlsplit(p).hostname):
        raise HrefRefused(f"{what} {p!r} points at an internal address (loopback, private or link-local); "
                          "copy the file and pass its local path")


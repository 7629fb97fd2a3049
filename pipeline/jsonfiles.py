"""Reading the JSON records the pipeline keeps (manifests, ``latest.json``, version records): a damaged file is
an error that names it and says what to do, not a bare ``JSONDecodeError`` ("Invalid control character at:
line 1 column 9")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import storage


class CorruptRecordError(ValueError):
    """A record file that is not valid JSON (or not the object it should be)."""


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """The parsed JSON object of ``path``; :class:`CorruptRecordError` naming ``what`` (e.g. "the inference
    manifest"), the file, the parser's complaint and ``fix`` (what the user can do) otherwise."""
    try:
        doc = json.loads(storage.read_bytes(path).decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptRecordError(f"{what} {path} is damaged ({e}); {fix}") from None
    if not isinstance(doc, dict):
        raise CorruptRecordError(f"{what} {path} holds a JSON {type(doc).__name__}, not an object; {fix}")
    return doc

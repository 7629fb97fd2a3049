"""A run report a person can look at: one static ``report.html`` beside each product (a land-cover map, a flood
map, an embeddings field).

The COGs, GeoParquet and STAC records are for machines; someone deciding whether a run is any good wants to see
the map, how much of each class it found, whether the model beat the simple baseline, what went in and what it
cost, on one page. So the page holds: the quicklook (a PNG) with its legend, class areas (km² and % of the mapped
area), metrics with the model and baseline side by side and their difference, provenance (preset, checkpoint and
its sha256, input items, dates), timings per stage, cost, and free notes (warnings, failed tiles).

Why plain HTML with an inline script and no libraries: the report must open offline, from a ``file://`` URL, from
an object-store download or an e-mail attachment, years later. So there is no CDN, no remote font and no tile
layer; the only other file it loads is the quicklook, linked by a relative path (copied beside the report when it
lies elsewhere), so the directory can be moved or synced as a whole. The interactive map is the same quicklook in
a pannable, zoomable viewport with the lon/lat under the cursor interpolated linearly between the quicklook's
corners (``bounds_lonlat``): exact for a lon/lat grid, approximate for a projected (e.g. UTM) product, and the
page says so.

Every value from the run (class names, item ids, notes) is HTML-escaped; the data the script needs travels as
JSON in a ``<script type="application/json">`` block with ``<`` escaped, so no value can end the script early.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

__all__ = ["RunReport", "save_report_json", "update_report", "write_report"]


@dataclass
class RunReport:
    """What one run's report shows. Only ``title`` and ``quicklook`` are needed; empty sections are left out.

    * ``quicklook``: a PNG of the product (class colours, or a colour ramp for a continuous product).
    * ``legend``: (class name, RGBA 0-255) pairs in display order; empty for a continuous product.
    * ``class_areas_km2``: class name -> area, km². The % column is of their sum (the mapped area, no nodata).
    * ``metrics``: rows ``{"name": "mIoU" or a class name, "model": float | None, "baseline": float | None}``;
      higher is better unless the row says ``"higher_is_better": False`` (e.g. an RMSE).
    * ``baseline_name``: what the baseline is ("raw-pixel classifier", "Otsu"); the baseline column's header.
    * ``truth_name``: what the metrics are measured against ("held-out tiles' labels").
    * ``provenance``: model preset, checkpoint (+ sha256), input items (a list: shown as a count and a
      collapsible list), dates. Values may be strings, numbers, lists or dicts.
    * ``timings_s``: stage -> wall seconds.
    * ``cost``: e.g. ``{"cpu_seconds", "gpu_seconds", "km2_per_hour", "area_km2"}``; other keys are shown as given.
    * ``bounds_lonlat``: (west, south, east, north) of the quicklook, degrees; None: the map shows pixel
      coordinates and no scale.
    * ``notes``: free lines (warnings, failed tiles).
    """

    title: str
    quicklook: str | Path
    legend: Sequence[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    class_areas_km2: Mapping[str, float] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    baseline_name: str | None = None
    truth_name: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    timings_s: Mapping[str, float] = field(default_factory=dict)
    cost: Mapping[str, Any] = field(default_factory=dict)
    bounds_lonlat: tuple[float, float, float, float] | None = None
    notes: list[str] = field(default_factory=list)


def write_report(report: RunReport, directory: str | Path, name: str = "report.html") -> Path:
    """Write ``report`` as ``directory/name`` (created if needed) and return its path.

    The quicklook is linked relatively: used in place when it lies inside ``directory``, copied beside the report
    otherwise. The page is written to a temporary file in ``directory`` and moved over ``name`` with
    ``os.replace``, so a reader (a browser, a sync job) sees the old report or the new one, never half of one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    href = _place_quicklook(Path(report.quicklook), directory)
    page = _render(report, href, generated=datetime.now(timezone.utc))
    dest = directory / name
    _atomic_write(dest, page.encode("utf-8"))
    return dest


def save_report_json(report: RunReport, path: str | Path) -> Path:
    """``report``'s content as JSON (written atomically), beside its HTML, so that a later step re-renders it with
    more in it (:func:`update_report`: the demo adds the scores against truth that inference cannot know). The
    quicklook is stored relative to the JSON: the product directory may move, or be built in a temporary one
    and uploaded."""
    path = Path(path)
    doc = asdict(report)
    doc["quicklook"] = os.path.relpath(Path(report.quicklook).resolve(), path.resolve().parent)
    _atomic_write(path, json.dumps(doc, indent=2, default=str).encode("utf-8"))
    return path


def update_report(report_html: str | Path, **changes) -> Path:
    """Re-render ``<stem>.html`` from its ``<stem>.json`` (:func:`save_report_json`) with ``changes`` (``metrics``,
    ``baseline_name``, ``truth_name``, ``notes``, ...); both files are rewritten. Returns the HTML's path."""
    html = Path(report_html)
    meta = html.with_suffix(".json")
    doc = {**json.loads(meta.read_text()), **changes}
    doc["quicklook"] = str(meta.parent / doc["quicklook"])
    doc["legend"] = [(n, tuple(c)) for n, c in doc.get("legend", [])]
    if doc.get("bounds_lonlat"):
        doc["bounds_lonlat"] = tuple(doc["bounds_lonlat"])
    report = RunReport(**doc)
    save_report_json(report, meta)
    return write_report(report, html.parent, name=html.name)


# --------------------------------------------------------------------------------------------- files


def _place_quicklook(src: Path, directory: Path) -> str:
    """The quicklook's URL relative to the report (copying it in when it lies outside ``directory``, over any
    file of the same name there)."""
    if not src.is_file():
        # A missing image would only show up as a broken picture and a console error in the browser.
        raise FileNotFoundError(f"quicklook {src} does not exist")
    src_abs, dir_abs = src.resolve(), directory.resolve()
    if not src_abs.is_relative_to(dir_abs):
        target = directory / src.name
        _atomic_copy(src_abs, target)
        src_abs = target.resolve()
    return quote(src_abs.relative_to(dir_abs).as_posix())


def _atomic_write(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _chmod_like_new_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_copy(src: Path, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        _chmod_like_new_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _chmod_like_new_file(path: str) -> None:
    # mkstemp makes files 0600; a report served by a web server or shared on a disk must be readable like any
    # file the user creates (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ------------------------------------------------------------------------------------------ formatting

_esc = html.escape  # quote=True: values also go into attributes


def _number(v: Any) -> float | None:
    """A finite float, or None for None / NaN / non-numbers (shown as a dash)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, digits: int = 2) -> str:
    f = _number(v)
    if f is None:
        return "—" if v is None or _is_nan(v) else _esc(str(v))
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,d}"
    return f"{f:,.{digits}f}"


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _rgba_css(rgba: Sequence[int]) -> str:
    r, g, b, *a = (int(c) for c in rgba)
    alpha = (a[0] if a else 255) / 255
    return f"rgba({r}, {g}, {b}, {alpha:.3f})"


def _section(title: str, body: str, sid: str) -> str:
    return f'<section id="{sid}">\n<h2>{_esc(title)}</h2>\n{body}\n</section>'


# ---------------------------------------------------------------------------------------------- parts


def _legend_html(legend: Sequence[tuple[str, Sequence[int]]]) -> str:
    if not legend:
        return ""
    items = "\n".join(
        f'<li><span class="swatch" style="background: {_rgba_css(rgba)}"></span>{_esc(str(name))}</li>'
        for name, rgba in legend
    )
    return f'<ul class="legend" aria-label="legend">\n{items}\n</ul>'


def _areas_html(areas: Mapping[str, float], legend: Sequence[tuple[str, Sequence[int]]]) -> str:
    if not areas:
        return ""
    # Legend order first (the order a reader already saw), then any class the legend lacks.
    named = [n for n, _ in legend]
    order = [n for n in named if n in areas] + [n for n in areas if n not in named]
    return _share_table([(n, areas[n]) for n in order], "areas", ("class", "area, km²", "% of mapped area"),
                        "mapped area", digits=2)


def _share_table(rows: Sequence[tuple[Any, Any]], css: str, headers: tuple[str, str, str], total_label: str,
                 digits: int) -> str:
    """A table of (label, value) rows with each value's share of their sum and a total row (class areas,
    stage timings); a value that is not a number shows a dash and counts 0."""
    total = sum(_number(v) or 0.0 for _, v in rows)
    out = []
    for label, v in rows:
        f = _number(v)
        pct = f"{100 * f / total:.1f}" if f is not None and total > 0 else "—"
        out.append(f"<tr><th scope=\"row\">{_esc(str(label))}</th><td>{_fmt(f, digits)}</td><td>{pct}</td></tr>")
    out.append(f'<tr class="total"><th scope="row">{_esc(total_label)}</th><td>{_fmt(total, digits)}</td>'
               f"<td>{'100.0' if total > 0 else '—'}</td></tr>")
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(out) + "\n</tbody></table>"


def _metrics_html(metrics: list[dict], baseline_name: str | None, truth_name: str | None) -> str:
    if not metrics:
        return ""
    base = baseline_name or "baseline"
    rows = []
    for row in metrics:
        m, b = _number(row.get("model")), _number(row.get("baseline"))
        higher = row.get("higher_is_better", True)
        m_cls = b_cls = ""
        diff = winner = "—"
        if m is not None and b is not None:
            d = m - b
            diff = f"{d:+.3f}"
            if abs(d) < 5e-4:  # equal at the 3 decimals shown
                winner = "tie"
            elif (d > 0) == bool(higher):
                winner, m_cls = "model", ' class="win"'
            else:
                winner, b_cls = _esc(base), ' class="win"'
        rows.append(
            f"<tr><th scope=\"row\">{_esc(str(row.get('name', '')))}</th>"
            f"<td{m_cls}>{_fmt(row.get('model'), 3)}</td><td{b_cls}>{_fmt(row.get('baseline'), 3)}</td>"
            f"<td>{diff}</td><td>{winner}</td></tr>"
        )
    caption = "higher is better unless marked; the better of the two is highlighted"
    if truth_name:
        caption = f"measured against {_esc(truth_name)}; " + caption
    return (f'<table class="metrics"><caption>{caption}</caption><thead><tr><th>metric</th><th>model</th>'
            f"<th>{_esc(base)}</th><th>model − {_esc(base)}</th><th>better</th></tr></thead><tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>")


def _value_html(v: Any) -> str:
    """A provenance value: lists as a count and a collapsible list, dicts as nested definitions."""
    if isinstance(v, Mapping):
        return _dl_html(v)
    if isinstance(v, (list, tuple, set, frozenset)):
        items = list(v)
        if not items:
            return "none"
        lis = "\n".join(f"<li>{_value_html(x)}</li>" for x in items)
        noun = "item" if len(items) == 1 else "items"
        return f"<details><summary>{len(items):,d} {noun}</summary><ol>\n{lis}\n</ol></details>"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _fmt(v, 3) if isinstance(v, float) else f"{v:,d}"
    return f"<code>{_esc(str(v))}</code>"


def _dl_html(d: Mapping[str, Any]) -> str:
    return "<dl>\n" + "\n".join(f"<dt>{_esc(str(k))}</dt><dd>{_value_html(v)}</dd>" for k, v in d.items()) + "\n</dl>"


def _timings_html(timings: Mapping[str, float]) -> str:
    if not timings:
        return ""
    return _share_table(list(timings.items()), "timings", ("stage", "wall time, s", "% of total"), "total",
                        digits=1)


# Known cost keys and how to label them (with units); other keys are shown as given.
_COST_LABELS = {
    "cpu_seconds": ("CPU time", "s", 1),
    "gpu_seconds": ("GPU time", "s", 1),
    "km2_per_hour": ("throughput", "km²/h", 1),
    "area_km2": ("area", "km²", 2),
}


def _cost_html(cost: Mapping[str, Any]) -> str:
    if not cost:
        return ""
    rows = []
    for k, v in cost.items():
        label, unit, digits = _COST_LABELS.get(k, (k, "", 3))
        shown = _fmt(v, digits) if _number(v) is not None or v is None else _value_html(v)
        rows.append(f"<tr><th scope=\"row\">{_esc(str(label))}</th><td>{shown}</td><td>{_esc(unit)}</td></tr>")
    return ('<table class="cost"><thead><tr><th>item</th><th>value</th><th>unit</th></tr></thead><tbody>\n'
            + "\n".join(rows) + "\n</tbody></table>")


def _notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    return '<ul class="notes">\n' + "\n".join(f"<li>{_esc(str(n))}</li>" for n in notes) + "\n</ul>"


def _script_json(obj: Any) -> str:
    # In a <script> block only "</script" (and "<!--") can end or confuse it: escaping every "<" rules both out.
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ------------------------------------------------------------------------------------------------ page

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>$title</title>
<style>
body { font-family: system-ui, "Liberation Sans", Arial, sans-serif; margin: 1.5rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1b1b1b; background: #fff; line-height: 1.4; }
header { border-bottom: 1px solid #ccc; margin-bottom: 1rem; }
h1 { margin: 0 0 .25rem; font-size: 1.6rem; }
h2 { font-size: 1.2rem; margin: 1.5rem 0 .5rem; }
.meta { color: #555; margin: 0 0 .75rem; }
.figure { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.figure img.quicklook { max-width: 100%; height: auto; border: 1px solid #ccc; $rendering }
.side { min-width: 16rem; }
ul.legend { list-style: none; padding: 0; margin: 0 0 1rem; }
ul.legend li { margin: .15rem 0; }
.swatch { display: inline-block; width: 1.1em; height: 1.1em; vertical-align: -.2em; margin-right: .5em;
          border: 1px solid #0006; }
table { border-collapse: collapse; margin: .25rem 0 .5rem; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: .9em; padding-top: .3rem; }
th, td { padding: .2rem .6rem; border-bottom: 1px solid #e3e3e3; text-align: left; }
td { text-align: right; font-variant-numeric: tabular-nums; }
tr.total th, tr.total td { border-top: 2px solid #999; font-weight: 600; }
td.win { background: #d8f0d8; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: .25rem 0; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
details ol { max-height: 20rem; overflow: auto; margin: .25rem 0; }
ul.notes li { margin: .2rem 0; }
#map { position: relative; height: 32rem; overflow: hidden; border: 1px solid #999; cursor: grab;
       background: repeating-conic-gradient(#eee 0 25%, #fff 0 50%) 0 0 / 20px 20px; touch-action: none; }
#map.dragging { cursor: grabbing; }
#map img { position: absolute; left: 0; top: 0; transform-origin: 0 0; max-width: none; user-select: none;
           -webkit-user-drag: none; $rendering }
.controls { position: absolute; top: .5rem; right: .5rem; display: flex; flex-direction: column; gap: .25rem; }
.controls button { width: 2rem; height: 2rem; font-size: 1.1rem; cursor: pointer; }
.readout { position: absolute; left: .5rem; bottom: .5rem; background: #fffd; padding: .15rem .4rem;
           font-variant-numeric: tabular-nums; font-size: .9em; }
.scalebar { position: absolute; right: .5rem; bottom: .5rem; background: #fffd; padding: .15rem .4rem;
            font-size: .9em; text-align: center; }
.scalebar div { height: .35rem; border: 2px solid #000; border-top: none; margin-top: .1rem; }
</style>
</head>
<body>
<header>
<h1>$title</h1>
<p class="meta">report written $generated</p>
</header>
$notes
<section id="product">
<div class="figure">
<img class="quicklook" src="$href" alt="quicklook of $title">
<div class="side">
$legend
$areas
</div>
</div>
</section>
$metrics
<section id="explore">
<h2>Explore the map</h2>
<div id="map" tabindex="0" aria-label="pannable, zoomable map: drag to pan, wheel or + / − to zoom">
<img id="map-image" src="$href" alt="quicklook of $title, zoomable" draggable="false">
<div class="controls">
<button type="button" id="zoom-in" title="zoom in">+</button>
<button type="button" id="zoom-out" title="zoom out">−</button>
<button type="button" id="zoom-reset" title="fit the whole map">⤢</button>
</div>
<div class="readout" id="readout">move the cursor over the map</div>
<div class="scalebar" id="scalebar" hidden><span id="scale-label"></span><div id="scale-bar"></div></div>
</div>
<p class="meta">$map_note</p>
</section>
$provenance
$timings
$cost
<script type="application/json" id="report-data">$data</script>
<script>
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var box = document.getElementById("map"), img = document.getElementById("map-image");
  var readout = document.getElementById("readout"), scalebar = document.getElementById("scalebar");
  var view = { s: 1, x: 0, y: 0 }, fitScale = 1, drag = null;
  var STEP = 1.5, MAX_ZOOM = 64;  // zoom factor per click; max zoom relative to the fitted view

  function apply() {
    img.style.transform = "translate(" + view.x + "px, " + view.y + "px) scale(" + view.s + ")";
    img.dataset.scale = String(view.s);
    updateScale();
  }
  function fit() {
    var w = img.naturalWidth, h = img.naturalHeight;
    if (!w || !h) { return; }
    fitScale = Math.min(box.clientWidth / w, box.clientHeight / h);
    view.s = fitScale;
    view.x = (box.clientWidth - w * fitScale) / 2;
    view.y = (box.clientHeight - h * fitScale) / 2;
    apply();
  }
  function zoomAt(factor, cx, cy) {  // cx, cy: the point that stays put, px from the viewport's corner
    var s = Math.min(Math.max(view.s * factor, fitScale / 4), fitScale * MAX_ZOOM);
    var k = s / view.s;
    view.x = cx - (cx - view.x) * k;
    view.y = cy - (cy - view.y) * k;
    view.s = s;
    apply();
  }
  function centre() { return [box.clientWidth / 2, box.clientHeight / 2]; }

  function niceKm(km) {  // the largest 1, 2 or 5 x 10^n not above km
    var p = Math.pow(10, Math.floor(Math.log10(km))), m = km / p;
    return (m >= 5 ? 5 : m >= 2 ? 2 : 1) * p;
  }
  function updateScale() {
    var b = data.bounds;
    if (!b || !img.naturalWidth) { scalebar.hidden = true; return; }
    var midLat = (b[1] + b[3]) / 2 * Math.PI / 180;
    // km per image pixel along x: degrees of longitude x 111.32 km x cos(latitude)
    var kmPerPx = (b[2] - b[0]) * 111.32 * Math.cos(midLat) / img.naturalWidth;
    var kmPer100 = 100 * kmPerPx / view.s;
    if (!(kmPer100 > 0)) { scalebar.hidden = true; return; }
    var km = niceKm(kmPer100);
    document.getElementById("scale-bar").style.width = (100 * km / kmPer100).toFixed(0) + "px";
    document.getElementById("scale-label").textContent =
      "≈ " + (km >= 1 ? km + " km" : Math.round(km * 1000) + " m");
    scalebar.hidden = false;
  }
  function showCursor(ev) {
    var r = box.getBoundingClientRect();
    var px = (ev.clientX - r.left - view.x) / view.s, py = (ev.clientY - r.top - view.y) / view.s;
    var w = img.naturalWidth, h = img.naturalHeight;
    if (!w || px < 0 || py < 0 || px >= w || py >= h) { readout.textContent = "outside the map"; return; }
    var b = data.bounds;
    if (!b) {
      readout.textContent = "pixel x " + Math.floor(px) + ", y " + Math.floor(py);
      return;
    }
    var lon = b[0] + (px / w) * (b[2] - b[0]), lat = b[3] - (py / h) * (b[3] - b[1]);
    readout.textContent = "lon " + lon.toFixed(5) + "°, lat " + lat.toFixed(5) + "° (approx.)";
  }

  box.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var r = box.getBoundingClientRect();
    zoomAt(Math.pow(STEP, -Math.sign(ev.deltaY)), ev.clientX - r.left, ev.clientY - r.top);
  }, { passive: false });
  box.addEventListener("pointerdown", function (ev) {
    if (ev.target.closest(".controls")) { return; }
    drag = { x: ev.clientX, y: ev.clientY, vx: view.x, vy: view.y };
    box.setPointerCapture(ev.pointerId);
    box.classList.add("dragging");
  });
  box.addEventListener("pointermove", function (ev) {
    if (drag) {
      view.x = drag.vx + ev.clientX - drag.x;
      view.y = drag.vy + ev.clientY - drag.y;
      apply();
    }
    showCursor(ev);
  });
  function endDrag() { drag = null; box.classList.remove("dragging"); }
  box.addEventListener("pointerup", endDrag);
  box.addEventListener("pointercancel", endDrag);
  box.addEventListener("keydown", function (ev) {
    if (ev.key === "+" || ev.key === "=") { zoomAt.apply(null, [STEP].concat(centre())); }
    else if (ev.key === "-") { zoomAt.apply(null, [1 / STEP].concat(centre())); }
    else if (ev.key === "0") { fit(); }
  });
  document.getElementById("zoom-in").addEventListener("click", function () {
    zoomAt.apply(null, [STEP].concat(centre()));
  });
  document.getElementById("zoom-out").addEventListener("click", function () {
    zoomAt.apply(null, [1 / STEP].concat(centre()));
  });
  document.getElementById("zoom-reset").addEventListener("click", fit);
  window.addEventListener("resize", fit);
  if (img.complete && img.naturalWidth) { fit(); } else { img.addEventListener("load", fit); }
})();
</script>
</body>
</html>
""")


def _render(r: RunReport, href: str, *, generated: datetime) -> str:
    title = _esc(str(r.title))
    metrics = _metrics_html(r.metrics, r.baseline_name, r.truth_name)
    provenance = _dl_html(r.provenance) if r.provenance else ""
    timings, cost, notes = _timings_html(r.timings_s), _cost_html(r.cost), _notes_html(r.notes)
    bounds = None
    if r.bounds_lonlat is not None:
        bounds = [float(v) for v in r.bounds_lonlat]
        if len(bounds) != 4 or not all(map(math.isfinite, bounds)) or bounds[0] >= bounds[2] or bounds[1] >= bounds[3]:
            raise ValueError(f"bounds_lonlat must be finite (west, south, east, north), got {r.bounds_lonlat}")
        w, s, e, n = bounds
        map_note = (f"West {w:.5f}°, south {s:.5f}°, east {e:.5f}°, north {n:.5f}°. The lon/lat under the cursor "
                    "is interpolated linearly between these corners: approximate for a projected (e.g. UTM) "
                    "product. The scale bar is for the map's middle latitude.")
    else:
        map_note = "No geographic bounds were given: the readout shows quicklook pixels."
    return _PAGE.substitute(
        title=title,
        generated=_esc(generated.strftime("%Y-%m-%d %H:%M UTC")),
        href=_esc(href),
        # Class maps: show each pixel as a crisp block when zoomed instead of blending neighbouring classes.
        rendering="image-rendering: pixelated;" if r.legend else "",
        legend=_legend_html(r.legend),
        areas=_areas_html(r.class_areas_km2, r.legend),
        metrics=_section("Metrics", metrics, "metrics") if metrics else "",
        map_note=_esc(map_note),
        provenance=_section("Provenance", provenance, "provenance") if provenance else "",
        timings=_section("Timings", timings, "timings") if timings else "",
        cost=_section("Cost", cost, "cost") if cost else "",
        # Notes (warnings, failed tiles) first: they change how everything below should be read.
        notes=_section("Notes", notes, "notes") if notes else "",
        data=_script_json({"bounds": bounds}),
    )

"""pipeline.report: the run report (report.html) as a person sees it, in a real headless Chromium.

The unit tests need no browser: escaping of hostile values, the relative quicklook link, the atomic write. The
browser tests open the report from its file:// URL in the Debian chromium + chromedriver (``make browser``,
infra/browser/install.sh) and check what a reader would: no console errors, the images loaded, the quicklook's
colours really on screen, the interactive map zooms, pans and reads out lon/lat, and the metric values are there.
They skip, naming what is missing, when the browser is not installed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image  # a hard dependency of matplotlib, so always in the venv

from pipeline.report import RunReport, write_report

W, H = 300, 200  # quicklook size, px
FOREST, WATER, URBAN, CROP = (34, 139, 34, 255), (30, 100, 220, 255), (200, 40, 40, 255), (240, 200, 60, 255)
LEGEND = [("forest", FOREST), ("water", WATER), ("urban", URBAN), ("cropland", CROP)]
BOUNDS = (10.0, 45.0, 10.3, 45.2)  # west, south, east, north, degrees
HOSTILE = "<script>alert(1)</script>"


def _make_quicklook(path: Path) -> Path:
    """A class map as a person would see it: four class patches and a river across them."""
    a = np.empty((H, W, 4), np.uint8)
    a[:, :] = FOREST
    a[: H // 2, W // 2 :] = CROP
    a[H // 2 :, : W // 3] = URBAN
    rows = np.arange(H)[:, None]
    cols = np.arange(W)[None, :]
    a[np.abs(rows - (0.4 * cols + 40)) < 8] = WATER
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGBA").save(path)
    return path


def _report(quicklook: Path, **kw) -> RunReport:
    args = dict(
        title="Land cover, Po delta, summer 2024",
        quicklook=quicklook,
        legend=LEGEND,
        class_areas_km2={"forest": 212.5, "water": 31.25, "urban": 48.0, "cropland": 160.0},
        metrics=[
            {"name": "mIoU", "model": 0.712, "baseline": 0.558},
            {"name": "water", "model": 0.931, "baseline": 0.952},
            {"name": "urban", "model": 0.604, "baseline": None},
            {"name": "area RMSE, km²", "model": 1.25, "baseline": 3.5, "higher_is_better": False},
        ],
        baseline_name="raw-pixel classifier",
        truth_name="held-out tiles' labels",
        provenance={
            "preset": "skysense-tiny",
            "checkpoint": "ckpt/landcover-v3.safetensors",
            "checkpoint_sha256": "9f" * 32,
            "input_items": [f"S2B_MSIL2A_20240{6 + i // 60}{1 + i % 28:02d}_T32TQR_{i:03d}" for i in range(120)],
            "dates": {"start": "2024-06-01", "end": "2024-08-31"},
        },
        timings_s={"ingest": 42.0, "inference": 310.5, "mosaic": 17.5},
        cost={"cpu_seconds": 1480.0, "gpu_seconds": 295.0, "km2_per_hour": 4400.0, "area_km2": 451.75},
        bounds_lonlat=BOUNDS,
        notes=["2 of 36 tiles failed (cloud cover); shown as nodata"],
    )
    args.update(kw)
    return RunReport(**args)


# ------------------------------------------------------------------------------------ without a browser


def test_hostile_values_are_escaped(tmp_path):
    ql = _make_quicklook(tmp_path / "ql.png")
    r = _report(
        ql,
        title=HOSTILE,
        legend=[(HOSTILE, FOREST)],
        class_areas_km2={HOSTILE: 1.0},
        metrics=[{"name": HOSTILE, "model": 0.5, "baseline": 0.4}],
        baseline_name=HOSTILE,
        truth_name=HOSTILE,
        provenance={HOSTILE: [HOSTILE], "x": HOSTILE},
        timings_s={HOSTILE: 1.0},
        cost={HOSTILE: HOSTILE},
        notes=[HOSTILE, 'a "quoted" note & more'],
    )
    text = write_report(r, tmp_path / "out").read_text()
    assert HOSTILE not in text and "alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert text.count("<script") == 2  # ours: the JSON data block and the map's code
    assert "a &quot;quoted&quot; note &amp; more" in text


def test_quicklook_is_linked_relatively(tmp_path):
    src = _make_quicklook(tmp_path / "elsewhere" / "quicklook.png")
    out = tmp_path / "product"
    text = write_report(_report(src), out).read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', text)
    assert srcs == ["quicklook.png", "quicklook.png"]  # the static figure and the interactive map
    assert (out / "quicklook.png").read_bytes() == src.read_bytes()  # copied beside the report
    assert str(tmp_path) not in text and "file:" not in text

    # Inside the directory already: linked where it lies (URL-quoted), not copied.
    inside = _make_quicklook(out / "assets" / "quick look.png")
    text = write_report(_report(inside), out).read_text()
    assert re.findall(r'<img[^>]*\ssrc="([^"]+)"', text) == ["assets/quick%20look.png"] * 2
    assert not (out / "quick look.png").exists()

    with pytest.raises(FileNotFoundError, match="quicklook"):
        write_report(_report(tmp_path / "missing.png"), out)
    with pytest.raises(ValueError, match="bounds_lonlat"):
        write_report(_report(src, bounds_lonlat=(10.0, 45.0, float("nan"), 46.0)), out)


def test_write_is_atomic(tmp_path, monkeypatch):
    ql = _make_quicklook(tmp_path / "ql.png")
    out = tmp_path / "out"
    old_umask = os.umask(0o022)
    try:
        path = write_report(_report(ql, title="first"), out)
    finally:
        os.umask(old_umask)
    assert path == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == ["ql.png", "report.html"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644  # readable like any file, not mkstemp's 0600

    # A write that fails half way leaves the old report whole and no temporary file.
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(_report(ql, title="second"), out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["ql.png", "report.html"]
    assert "<h1>first</h1>" in path.read_text()


# ------------------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    ql = _make_quicklook(base / "render" / "quicklook.png")  # outside the product directory: gets copied
    return write_report(_report(ql), base / "products" / "landcover")


@pytest.fixture
def page(driver, report_file):
    """The report freshly loaded (no zoom or pan left over from another test), console log drained."""
    driver.get(report_file.as_uri())
    driver.execute_script("window.scrollTo(0, 0)")
    return driver


def _console_errors(driver) -> list[dict]:
    # SEVERE holds uncaught JS exceptions, failed resource loads (a missing image or favicon) and console.error.
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _map_scale(driver) -> float:
    return driver.execute_script(
        "return new DOMMatrixReadOnly(getComputedStyle(document.getElementById('map-image')).transform).a")


def _map_offset(driver) -> tuple[float, float]:
    return tuple(driver.execute_script(
        "var m = new DOMMatrixReadOnly(getComputedStyle(document.getElementById('map-image')).transform);"
        "return [m.e, m.f];"))


def test_console_check_sees_errors(driver, tmp_path):
    """Control: a broken page does show up as SEVERE entries, so the empty logs below mean something."""
    (tmp_path / "broken.html").write_text('<!DOCTYPE html><link rel="icon" href="data:,"><img src="nope.png">'
                                          "<script>undefinedFunction();</script>")
    driver.get((tmp_path / "broken.html").as_uri())
    msgs = " ".join(e["message"] for e in _console_errors(driver))
    assert "nope.png" in msgs and "undefinedFunction" in msgs


def test_page_loads_cleanly(page):
    assert page.title == "Land cover, Po delta, summer 2024"
    state = page.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth,"
        " i.naturalHeight]);")
    assert state == [["quicklook.png", True, W, H]] * 2
    assert _console_errors(page) == []


def _colour_counts(shot: np.ndarray, rect: dict) -> dict[str, int]:
    x0, y0 = round(rect["x"]), round(rect["y"])
    crop = shot[y0 : y0 + round(rect["h"]), x0 : x0 + round(rect["w"]), :3]
    return {name: int(np.all(crop == np.array(rgba[:3], np.uint8), axis=-1).sum()) for name, rgba in LEGEND}


def test_screenshot_shows_the_quicklook(page, report_file):
    rects = page.execute_script(
        "document.getElementById('map').scrollIntoView({block: 'end'});"
        "var f = r => ({x: r.left, y: r.top, w: r.width, h: r.height});"
        "return [f(document.querySelector('img.quicklook').getBoundingClientRect()),"
        "        f(document.getElementById('map').getBoundingClientRect()), devicePixelRatio, innerHeight];")
    static, viewport, dpr, inner_h = rects
    assert dpr == 1
    assert static["y"] >= 0 and viewport["y"] + viewport["h"] <= inner_h  # both on screen
    shot = np.asarray(Image.open(io.BytesIO(page.get_screenshot_as_png())).convert("RGB"))
    truth = np.asarray(Image.open(report_file.parent / "quicklook.png"))
    expected = {name: int(np.all(truth == np.array(rgba, np.uint8), axis=-1).sum()) for name, rgba in LEGEND}

    # The static figure at its natural size: every pixel shows (the 1 px border lies outside the image's box
    # only in part, so allow a little).
    counts = _colour_counts(shot, static)
    for name in expected:
        assert counts[name] >= 0.95 * expected[name], (name, counts, expected)

    # The interactive map fitted to its viewport: each class covers about its share of the scaled image.
    scale = _map_scale(page)
    assert scale > 1
    counts = _colour_counts(shot, viewport)
    for name in expected:
        assert counts[name] >= 0.9 * expected[name] * scale**2, (name, counts, expected, scale)
    assert _console_errors(page) == []


def test_map_zooms_and_pans(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    fitted = _map_scale(page)
    page.find_element(By.ID, "zoom-in").click()
    assert _map_scale(page) == pytest.approx(fitted * 1.5)
    page.find_element(By.ID, "zoom-out").click()
    assert _map_scale(page) == pytest.approx(fitted)

    # The mouse wheel zooms about the cursor.
    wheel = ("var m = document.getElementById('map'), r = m.getBoundingClientRect();"
             "m.dispatchEvent(new WheelEvent('wheel', {deltaY: arguments[0], clientX: r.left + 100,"
             " clientY: r.top + 100, bubbles: true, cancelable: true}));")
    page.execute_script(wheel, -100)
    assert _map_scale(page) == pytest.approx(fitted * 1.5)
    page.execute_script(wheel, 100)
    assert _map_scale(page) == pytest.approx(fitted)

    # Dragging with a real mouse pans by the distance moved.
    x0, y0 = _map_offset(page)
    box = page.find_element(By.ID, "map")
    ActionChains(page).move_to_element(box).click_and_hold().move_by_offset(60, -40).release().perform()
    x1, y1 = _map_offset(page)
    assert (x1 - x0, y1 - y0) == pytest.approx((60, -40), abs=1)
    assert _map_scale(page) == pytest.approx(fitted)

    page.find_element(By.ID, "zoom-reset").click()
    assert _map_offset(page) == pytest.approx((x0, y0), abs=0.5)
    assert page.find_element(By.ID, "scale-label").text.startswith("≈ ")
    assert _console_errors(page) == []


def test_cursor_shows_lonlat(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    # The pointer over the middle of the fitted map reads the middle of the bounds, to within a pixel.
    ActionChains(page).move_to_element(page.find_element(By.ID, "map-image")).perform()
    text = page.find_element(By.ID, "readout").text
    m = re.fullmatch(r"lon (-?[\d.]+)°, lat (-?[\d.]+)° \(approx\.\)", text)
    assert m, text
    west, south, east, north = BOUNDS
    assert float(m[1]) == pytest.approx((west + east) / 2, abs=2 * (east - west) / W)
    assert float(m[2]) == pytest.approx((south + north) / 2, abs=2 * (north - south) / H)
    assert "approximate for a projected" in page.find_element(By.ID, "explore").text
    assert _console_errors(page) == []


def test_page_text(page):
    from selenium.webdriver.common.by import By

    metrics = page.find_element(By.CSS_SELECTOR, "table.metrics")
    header = [th.text for th in metrics.find_elements(By.CSS_SELECTOR, "thead th")]
    assert header == ["metric", "model", "raw-pixel classifier", "model − raw-pixel classifier", "better"]
    rows = [[c.text for c in tr.find_elements(By.CSS_SELECTOR, "th, td")]
            for tr in metrics.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert rows == [
        ["mIoU", "0.712", "0.558", "+0.154", "model"],
        ["water", "0.931", "0.952", "-0.021", "raw-pixel classifier"],
        ["urban", "0.604", "—", "—", "—"],
        ["area RMSE, km²", "1.250", "3.500", "-2.250", "model"],  # lower is better here
    ]
    wins = [td.text for td in metrics.find_elements(By.CSS_SELECTOR, "td.win")]
    assert wins == ["0.712", "0.952", "1.250"]
    assert "held-out tiles' labels" in metrics.text

    areas = page.find_element(By.CSS_SELECTOR, "table.areas").text
    assert "forest 212.50 47.0" in areas and "mapped area 451.75 100.0" in areas
    assert "total 370.0 100.0" in page.find_element(By.CSS_SELECTOR, "table.timings").text
    assert "throughput 4,400.0 km²/h" in page.find_element(By.CSS_SELECTOR, "table.cost").text
    assert [li.text for li in page.find_elements(By.CSS_SELECTOR, "ul.legend li")] == [n for n, _ in LEGEND]

    # The long item list: a count, collapsed until asked for.
    prov = page.find_element(By.ID, "provenance")
    assert "9f" * 32 in prov.text and "120 items" in prov.text
    last = prov.find_elements(By.CSS_SELECTOR, "details li")[-1]
    assert not last.is_displayed()
    prov.find_element(By.CSS_SELECTOR, "details summary").click()
    assert last.text == "S2B_MSIL2A_20240708_T32TQR_119"
    assert _console_errors(page) == []


def test_continuous_product_without_bounds(driver, tmp_path):
    """An embeddings field: no legend, no areas or metrics, no bounds; the map reads out pixels."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ql = _make_quicklook(tmp_path / "emb.png")
    path = write_report(RunReport("Embeddings field", ql, notes=["no labels here"]), tmp_path / "emb")
    driver.get(path.as_uri())
    assert driver.find_elements(By.CSS_SELECTOR, "table") == []
    assert not driver.find_element(By.ID, "scalebar").is_displayed()
    ActionChains(driver).move_to_element(driver.find_element(By.ID, "map-image")).perform()
    assert re.fullmatch(r"pixel x 1[45]\d, y (9\d|10\d)", driver.find_element(By.ID, "readout").text)
    assert _console_errors(driver) == []


def test_copied_report_directory_still_works(driver, report_file, tmp_path):
    """The product directory moved elsewhere (a sync, a download) still shows its quicklook."""
    moved = tmp_path / "moved"
    shutil.copytree(report_file.parent, moved)
    driver.get((moved / report_file.name).as_uri())
    assert driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert _console_errors(driver) == []

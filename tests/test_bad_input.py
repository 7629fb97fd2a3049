"""What bad input gets: every entry point refuses what a user (or a hostile file) can pass in with a one-line
message naming the bad thing and exit 2 (3 for "busy"), before any work starts, and nothing of the user's is
replaced. The cases are data; the test runs each through the job's own ``main`` (in this process, real files,
a real local HTTP server) and the README's table "What bad input gets" is the record of what they printed:
the last test fails when the README is out of date (``SKYSENSE_UPDATE_README=1`` rewrites the table)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import threading
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"
RESULTS: list[tuple[str, str, int, str]] = []  # (entry point, case, exit code, message), filled by the cases


def _main(job: str):
    if job == "stac":
        from pipeline.stac import main
        return main
    spec = importlib.util.spec_from_file_location(f"_bad_input_{job}", REPO / "jobs" / f"{job}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@dataclass
class Case:
    job: str
    what: str  # the row's description
    args: list[str]  # {tmp}, {region}, {url}, {hostport} are filled in
    code: int
    message: str  # a regular expression the stderr must match


CASES = [
    Case("ingest", "AOI file that is a bare JSON list", ["--aoi", "{tmp}/list.json"], 2, "not a JSON list"),
    Case("ingest", "AOI Feature without geometry", ["--aoi", "{tmp}/nogeom.json"], 2, "holds no geometry"),
    Case("ingest", "AOI polygon of 2 points", ["--aoi", "{tmp}/line.json"], 2, "needs at least 4 positions"),
    Case("ingest", "AOI west of Greenwich as a bbox string", ["--aoi", "-0.775,38.09,-0.70,38.15",
                                                             "--catalog", "{tmp}/nowhere"], 2, "no STAC catalog"),
    Case("ingest", "bbox with max < min", ["--bbox", "9", "45", "8", "46"], 2, "min < max"),
    Case("ingest", "--end before --start", ["--end", "2023-01-01"], 2, "is before --start"),
    Case("ingest", "--out is a file", ["--out", "{tmp}/file.txt"], 2, "is a file, not a cube directory"),
    Case("ingest", "--out is a non-empty directory that is not a cube", ["--out", "{tmp}/mydata"], 2,
         "exists and is not a cube.*--overwrite"),
    Case("ingest", "--catalog is a web page, not STAC", ["--catalog", "{url}/"], 2, "not STAC JSON"),
    Case("ingest", "an item reads file:///etc/passwd as a band", ["--catalog", "{tmp}/evil/catalog.json",
                                                                 "--allow-href", "{region}"], 2,
         "file:///etc/passwd' is a local file outside the catalog's directory"),
    Case("ingest", "a child link escapes the catalog with ../", ["--catalog", "{tmp}/escape/catalog.json"], 2,
         "outside the catalog's directory"),
    Case("ingest", "another ingest writes the same cube", ["--out", "{tmp}/locked.zarr"], 3,
         "another ingest into this cube holds"),
    Case("ingest", "--t-s2 -1", ["--t-s2", "-1"], 2, "--t-s2 must be at least 0"),
    Case("ingest", "--ray-address is a web server, not Ray", ["--ray-address", "{hostport}", "--out",
                                                             "{tmp}/web.zarr"], 2,
         "answers but is not a Ray cluster"),
    Case("stac", "--max-items -1", ["{region}", "--max-items", "-1"], 2, "--max-items must be at least 1"),
    Case("stac", "inverted --datetime interval", ["{region}", "--datetime", "2024-06-01/2024-05-01"], 2,
         "ends before it starts"),
    Case("finetune", "--cube that is not a cube", ["--cube", "{tmp}/mydata"], 2, "--cube .*no cube at"),
    Case("finetune", "--checkpoint that is a pickle", ["--checkpoint", "{tmp}/model.pt"], 2,
         "not a safetensors checkpoint"),
    Case("finetune", "--out that already holds a head", ["--out", "{tmp}/run-with-head"], 2,
         "already holds a fine-tuned head.*--overwrite"),
    Case("finetune", "--labels that do not overlap the cube", ["--labels", "{tmp}/far-labels.tif"], 2,
         "does not overlap any done tile"),
    Case("finetune", "--steps 0", ["--steps", "0"], 2, "--steps must be at least 1"),
    Case("pretrain", "--init that is a pickle", ["--init", "{tmp}/model.pt"], 2,
         "--init: .*not a safetensors checkpoint.*a pickle never is"),
    Case("demo", "--seed -1", ["--seed", "-1"], 2, "--seed must be a non-negative integer"),
    Case("demo", "--size-km 0.005", ["--size-km", "0.005"], 2, "the demo needs at least"),
    Case("demo", "--out is a file", ["--out", "{tmp}/file.txt"], 2, "is a file, not a directory"),
    Case("refresh", "AOI polygon of 2 points", ["--aoi", "{tmp}/line.json"], 2, "needs at least 4 positions"),
    Case("refresh", "--support tiles outside the AOI", ["--checkpoint", "{tmp}/tiny.safetensors", "--support",
                                                        '{{"labels": "x.tif", "tiles": ["32N_0001_0001"]}}'], 2,
         "32N_0001_0001 lie outside the --aoi"),
    Case("refresh", "--min-mapping-unit -1", ["--min-mapping-unit", "-1"], 2, "--min-mapping-unit must be >= 0"),
]

DEFAULTS = {
    "ingest": ["--catalog", "{region}/catalog.json", "--bbox", "{bbox}", "--start",
               "2024-05-10", "--end", "2024-06-10", "--out", "{tmp}/cube.zarr", "--ray-address", "127.0.0.1:9"],
    "stac": [],
    "finetune": ["--cube", "{tmp}/cube.zarr", "--labels", "{region}/truth/landcover_10m.tif", "--checkpoint",
                 "{tmp}/tiny.safetensors", "--out", "{tmp}/ft"],
    "pretrain": ["--cube", "{tmp}/cube.zarr", "--preset", "tiny", "--steps", "2", "--out", "{tmp}/runs"],
    "demo": ["--out", "{tmp}/demo"],
    "refresh": ["--product", "flood", "--catalog", "{region}/catalog.json", "--aoi", "{bbox}",
                "--state", "{tmp}/state", "--ray-address", "127.0.0.1:9"],
}


def _merge(defaults: list[str], args: list[str]) -> list[str]:
    """The defaults with the case's flags replacing theirs (positional arguments of the case first)."""
    out = list(defaults)
    if "--aoi" in args and "--bbox" in out:  # the two are exclusive
        j = out.index("--bbox")
        del out[j:j + 2]
    positional = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            positional.append(a)
            i += 1
            continue
        n = 1
        while i + n < len(args) and not (args[i + n].startswith("--") and not re.match(r"^-\d", args[i + n])):
            n += 1
        if a in out:
            j = out.index(a)
            k = 1
            while j + k < len(out) and not out[j + k].startswith("--"):
                k += 1
            out[j:j + k] = args[i:i + n]
        else:
            out += args[i:i + n]
        i += n
    return positional + out


@pytest.fixture(scope="module")
def world(demo_region, tmp_path_factory):
    """The files the cases point at: bad AOIs, a file, a non-cube directory, a pickle, a minimal cube, a head,
    labels elsewhere, catalogs with a hostile href and a ../ link, a held ingest lock, a web page."""
    import rasterio
    import torch
    from rasterio.transform import from_origin

    from pipeline import zarr_cube
    from pipeline.cube import CubeConfig
    from pipeline.demo import region_bbox
    from pipeline.grid import TileGrid, load_aoi, tiles_for_aoi
    from pipeline.locks import RunLock
    from skysense_core import build_model
    from skysense_core.checkpoint import save_checkpoint

    catalog, dcfg = demo_region
    x0, y0, x1, y1 = region_bbox(dcfg)
    bbox = [x0 + 0.3 * (x1 - x0), y0 + 0.3 * (y1 - y0), x0 + 0.4 * (x1 - x0), y0 + 0.4 * (y1 - y0)]
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "nogeom.json").write_text(json.dumps({"type": "Feature", "geometry": None, "properties": {}}))
    (tmp / "line.json").write_text(json.dumps({"type": "Polygon", "coordinates": [[[9.0, 45.1], [9.01, 45.12]]]}))
    (tmp / "file.txt").write_text("mine")
    (tmp / "mydata").mkdir()
    (tmp / "mydata" / "thesis.txt").write_text("do not delete")
    (tmp / "model.pt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    torch.manual_seed(0)
    save_checkpoint(tmp / "tiny.safetensors", build_model("tiny", hr_ratio=8), meta={"what": "bad-input tests"})
    (tmp / "run-with-head").mkdir()
    (tmp / "run-with-head" / "head.safetensors").write_bytes(b"an earlier head")
    cfg = CubeConfig(grid=TileGrid(32, 8), t_s2=3, t_s1=2, t_hr=1, hr_ratio=8)
    tiles = tiles_for_aoi(load_aoi(bbox), cfg.grid)
    root = zarr_cube.create_or_open(tmp / "cube.zarr", cfg, tiles, {"start": "2024-05-10", "end": "2024-06-10"})
    root["index/status"][:] = zarr_cube.DONE
    with rasterio.open(tmp / "far-labels.tif", "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(100.0, 10.0, 0.001, 0.001)) as w:
        w.write(np.ones((1, 8, 8), np.uint8))
    # a catalog whose first item of 17 May reads /etc/passwd as B04 (the rest reads the region, allowed)
    import shutil

    shutil.copytree(catalog.parent, tmp / "evil", ignore=shutil.ignore_patterns("*.tif", "truth"))
    item = next(f for f in sorted((tmp / "evil" / "sentinel-2-l2a").rglob("*.json")) if "20240517" in f.name)
    d = json.loads(item.read_text())
    d["assets"]["B04"]["href"] = "file:///etc/passwd"
    item.write_text(json.dumps(d))
    (tmp / "escape").mkdir()
    (tmp / "escape" / "catalog.json").write_text(json.dumps(
        {"type": "Catalog", "stac_version": "1.1.0", "id": "x", "description": "x",
         "links": [{"rel": "child", "href": "../evil/catalog.json"}]}))
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("<html>not STAC</html>")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(www)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    lock = RunLock(tmp / ".locked.zarr.lock", what="ingest into this cube").__enter__()
    yield {"tmp": str(tmp), "region": str(catalog.parent), "url": f"http://127.0.0.1:{srv.server_address[1]}",
           "hostport": f"127.0.0.1:{srv.server_address[1]}",
           "bbox": ",".join(f"{v:.5f}" for v in bbox)}
    lock.__exit__(None, None, None)
    srv.shutdown()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.job}: {c.what}" for c in CASES])
def test_bad_input_is_refused_with_a_message(case, world, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = [a.format(**world) for a in _merge(DEFAULTS[case.job], case.args)]
    before = {p: p.read_bytes() for p in Path(world["tmp"]).rglob("*") if p.is_file() and p.suffix in (".txt",)}
    try:
        code = _main(case.job)(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    message = next((ln for ln in reversed(err.splitlines()) if "error" in ln or "busy" in ln), err[-300:])
    message = re.sub(r"^\S+\.py: ", "", message).replace(world["tmp"], "…").replace(world["region"], "REGION")
    message = message.replace(world["url"], "http://127.0.0.1:PORT").replace(world["bbox"], "BBOX")
    message = message.replace(world["hostport"], "127.0.0.1:PORT")
    message = re.sub(r"\(pid \d+ since [^)]*\)", "(pid P since T)", message)
    RESULTS.append((case.job, case.what, code, message))
    assert code == case.code, err[-3000:]
    assert re.search(case.message, err), err[-3000:]
    assert "Traceback" not in err
    for p, data in before.items():  # nothing of the user's was touched
        assert p.read_bytes() == data, p
    assert (Path(world["tmp"]) / "mydata" / "thesis.txt").read_text() == "do not delete"


def table() -> str:
    rows = ["| entry point | input | exit | message |", "|---|---|---|---|"]
    for job, what, code, msg in RESULTS:
        entry = "python -m pipeline.stac" if job == "stac" else f"jobs/{job}.py"
        msg = msg if len(msg) <= 220 else msg[:217] + "..."
        rows.append(f"| `{entry}` | {what} | {code} | {msg.replace('|', '/')} |")
    return "\n".join(rows)


def test_the_readme_table_is_what_the_cases_printed():
    if len(RESULTS) != len(CASES):
        pytest.skip("run the whole module: the table is made from every case's result")
    text = README.read_text()
    assert START in text and END in text, "README lacks the bad-input table markers"
    new = text[:text.index(START) + len(START)] + "\n" + table() + "\n" + text[text.index(END):]
    if os.environ.get("SKYSENSE_UPDATE_README") == "1":
        README.write_text(new)
        return
    assert new == text, ("README's 'What bad input gets' table differs from what the cases printed: run "
                         "SKYSENSE_UPDATE_README=1 .venv/bin/python -m pytest tests/test_bad_input.py")

"""Benchmark: the embedding field against float32 F_fus, on the demo.

One run of ``jobs/infer.py --task embeddings`` each way over the same cube and encoder, then three figures, as
JSON lines:

- ``bytes``: bytes per km² on disk of the float32 COG of F_fus (``--embedding-dtype float32``, the product
  before the field existed) and of the int8 field (``pipeline.embedding_field``, Zarr v3, one chunk per tile),
  with their ratio;
- ``probe``: a linear probe (``pipeline.baselines.raw_pixel_baseline``'s classifier: standardised logistic
  regression) trained on the land-cover truth of the demo's training tiles and scored (mIoU) on its held-out
  tiles (the split of ``pipeline.finetune.split_tiles``, the tiles every demo figure is reported on), on the
  float features and on the dequantised field: what quantisation costs; the raw-pixel baseline on the same
  pixels beside them;
- ``similarity``: :func:`pipeline.embedding_field.most_similar` (cosine, streamed by chunk) over the whole
  field: seconds per million pixels, and whether a query pixel's nearest neighbours share its class (the share
  of the top ``--k`` matches with the query's class, against that class's share of all pixels).

    python bench/embeddings.py [--demo out/demo] [--queries 20] [--k 50] [--out DIR]

Needs ``make demo`` first (its cube, pretrained encoder and truth).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.baselines import raw_pixel_baseline  # noqa: E402
from pipeline.embedding_field import dequantise, most_similar, open_field  # noqa: E402
from pipeline.finetune import split_tiles  # noqa: E402
from pipeline.grid import parse_tile_id  # noqa: E402
from pipeline.inference import InferenceConfig, run_inference  # noqa: E402
from pipeline.labels import NODATA, labels_on_tile  # noqa: E402
from pipeline.zarr_cube import cube_config, open_cube  # noqa: E402


def du(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tile_pixels(cube: str, tiles: list[str], truth: Path, read) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) features and (N,) labels of every labelled pixel of the tiles' cores; ``read(tile)`` -> (F, n, n)."""
    grid = cube_config(open_cube(cube)).grid
    xs, ys = [], []
    for t in tiles:
        c0, n = grid.halo_px, grid.tile_px
        lab = labels_on_tile(truth, t, cube, hr=False)[c0:c0 + n, c0:c0 + n]
        f = read(t)
        ok = (lab != NODATA) & np.isfinite(f).all(0)
        xs.append(f[:, ok].T)
        ys.append(lab[ok].astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=ROOT / "out" / "demo")
    p.add_argument("--queries", type=int, default=20, help="similarity queries (random labelled pixels)")
    p.add_argument("--k", type=int, default=50, help="matches per similarity query")
    p.add_argument("--train-pixels", type=int, default=4000, help="probe training pixels per tile (random)")
    p.add_argument("--out", type=Path, default=None, help="where the two products go (default a temp dir)")
    a = p.parse_args(argv)
    cube = a.demo / "cube.zarr"
    encoder = a.demo / "runs" / "demo-tiny-stage1" / "model.safetensors"
    truth = a.demo / "region" / "truth" / "landcover_10m.tif"
    missing = [str(x) for x in (cube, encoder, truth) if not x.exists()]
    if missing:
        print(f"error: {', '.join(missing)} missing: run `make demo` first", file=sys.stderr)
        return 2
    import rasterio
    import rasterio.warp

    out = a.out or Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    runs = {}
    for name, dtype, path in (("float32", "float32", out / "fus.tif"), ("int8", "int8", out / "field.zarr")):
        t0 = time.perf_counter()
        res = run_inference(InferenceConfig(cube=str(cube), checkpoint=str(encoder), task="embeddings", out=str(path),
                                            embedding_dtype=dtype, overwrite=True, report=False), progress=None)
        if not res.complete:
            print(f"error: the {name} run left tiles undone: {res.failed}", file=sys.stderr)
            return 1
        runs[name] = {"path": path, "seconds": time.perf_counter() - t0, "tiles": len(res.done)}
    grid = cube_config(open_cube(str(cube))).grid
    tiles = sorted(res.done)
    area_km2 = len(tiles) * (grid.tile_px * 10 / 1000) ** 2
    b_float, b_int8 = du(runs["float32"]["path"]), du(runs["int8"]["path"])
    print(json.dumps({"bench": "embeddings", "what": "bytes", "tiles": len(tiles), "area_km2": round(area_km2, 3),
                      "float32_cog_bytes_per_km2": round(b_float / area_km2),
                      "int8_field_bytes_per_km2": round(b_int8 / area_km2), "ratio": round(b_float / b_int8, 2),
                      "float32_run_s": round(runs["float32"]["seconds"], 1),
                      "int8_run_s": round(runs["int8"]["seconds"], 1)}))

    # the probe: the demo's split (every 4th tile held out), float F_fus vs the dequantised field
    train_tiles, held_out = split_tiles(tiles, 4)
    field = open_field(runs["int8"]["path"], decode=False)["embedding"]
    fsrc = rasterio.open(runs["float32"]["path"])

    def read_float(t):
        return fsrc.read(window=fsrc.window(*parse_tile_id(t, grid).core_bounds()))

    def read_int8(t):
        x0, _, _, y1 = parse_tile_id(t, grid).core_bounds()
        side = grid.tile_px * 10
        return dequantise(field.sel(x=slice(x0, x0 + side), y=slice(y1, y1 - side)).values)

    rng = np.random.default_rng(0)
    figures = {}
    for name, read in (("float32", read_float), ("int8", read_int8)):
        xtr, ytr = tile_pixels(str(cube), train_tiles, truth, read)
        keep = rng.permutation(len(ytr))[: a.train_pixels * len(train_tiles)]
        xte, yte = tile_pixels(str(cube), held_out, truth, read)
        figures[name] = raw_pixel_baseline(xtr[keep], ytr[keep], xte, yte, int(max(ytr.max(), yte.max())) + 1)
    baseline_file = a.demo / "runs" / "demo-landcover-head" / "baseline.json"
    raw = json.loads(baseline_file.read_text()) if baseline_file.exists() else None
    print(json.dumps({"bench": "embeddings", "what": "probe", "held_out_tiles": len(held_out),
                      "test_pixels": figures["float32"]["pixels"],
                      "miou_float32": round(figures["float32"]["miou"], 4),
                      "miou_int8": round(figures["int8"]["miou"], 4),
                      "int8_minus_float32": round(figures["int8"]["miou"] - figures["float32"]["miou"], 4),
                      "raw_pixel_baseline_miou": round(raw["miou"], 4) if raw else None,
                      "probe": figures["float32"]["classifier"]}))

    # similarity: whole-field queries from random labelled pixels of the held-out tiles
    labels = {t: labels_on_tile(truth, t, str(cube), hr=False)[grid.halo_px:grid.halo_px + grid.tile_px,
                                                                 grid.halo_px:grid.halo_px + grid.tile_px]
              for t in tiles}
    all_labels = np.concatenate([v[v != NODATA] for v in labels.values()])
    share = np.bincount(all_labels, minlength=256) / len(all_labels)
    tsrc = rasterio.open(truth)
    seconds, hits, base = [], [], []
    px = len(tiles) * grid.tile_px ** 2
    for _ in range(a.queries):
        t = held_out[rng.integers(len(held_out))]
        lab = labels[t]
        r, c = rng.integers(grid.tile_px, size=2)
        if lab[r, c] == NODATA:
            continue
        x0, _, _, y1 = parse_tile_id(t, grid).core_bounds()
        x, y = x0 + (c + 0.5) * 10, y1 - (r + 0.5) * 10
        q = field.sel(x=x, y=y, method="nearest").values
        t0 = time.perf_counter()
        best = most_similar(runs["int8"]["path"], q, k=a.k)
        seconds.append(time.perf_counter() - t0)
        mx, my = rasterio.warp.transform(f"EPSG:{parse_tile_id(t, grid).epsg}", tsrc.crs, [m.x for m in best],
                                         [m.y for m in best])
        got = np.array([v[0] for v in tsrc.sample(list(zip(mx, my, strict=True)))])
        hits.append(float((got == lab[r, c]).mean()))
        base.append(float(share[lab[r, c]]))
    print(json.dumps({"bench": "embeddings", "what": "similarity", "queries": len(seconds), "k": a.k,
                      "field_pixels": px, "s_per_query": round(float(np.median(seconds)), 4),
                      "s_per_million_px": round(float(np.median(seconds)) / px * 1e6, 4),
                      "same_class_share_of_matches": round(float(np.mean(hits)), 4),
                      "class_share_of_all_pixels": round(float(np.mean(base)), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Predict a cube with a SkySense model on Ray and mosaic the tiles into one Cloud-Optimized GeoTIFF.

    python jobs/infer.py --cube CUBE --checkpoint CKPT --task landcover|fewshot|embeddings --out OUT.tif
                         [--support TILES_AND_LABELS] [--window N] [--overlap N] [--margin N] [--batch-size N] [--gpu]
                         [--crs EPSG] [--overwrite] [--allow-partial] [--name NAME] [--work-dir DIR]
                         [--ray-address ADDR] [--num-actors N] [--min-mapping-unit M2] [--simplify M] [--no-vectors]
                         [--no-report] [--embedding-dtype int8|float32] [--embedding-cog] [--allow-href DIR]
    ray job submit --working-dir . -- python jobs/infer.py ...

CKPT: for landcover, a fine-tune run directory (jobs/finetune.py --out) or its head.safetensors, which names the
encoder it was trained on; for fewshot and embeddings, an encoder checkpoint (jobs/pretrain.py's
model.safetensors). Writes OUT.tif (uint8 classes, nodata 255, colour table, class names), OUT.png (quicklook),
OUT.json (STAC item); for class maps also OUT.confidence.tif (uint8 percent of the top class, calibrated by the
head's temperature), OUT.parquet (the classes as polygons, GeoParquet) and OUT.report.html (quicklook, legend,
class areas, provenance, timings, cost; static, opens offline). Embeddings: OUT.zarr, the embedding field (64-d
unit vectors as int8, one Zarr v3 chunk per tile; OUT may end in .zarr), plus an int8 COG when OUT ends in .tif
or with --embedding-cog; --embedding-dtype float32 writes the raw F_fus bands as a float32 COG (nodata NaN)
instead. The per-tile GeoTIFFs with manifest.json go to WORK_DIR/NAME (default: OUT's directory / OUT's stem +
".tiles"). A re-run skips the tiles already done with the
same settings. Prints a JSON summary line. Exit codes: 0 done (with --allow-partial: also when tiles failed),
1 tiles failed or the run failed, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import zarr_cube  # noqa: E402
from pipeline.inference import DEFAULT_PART_PX, TASKS, InferenceConfig, run_inference  # noqa: E402

SUPPORT_HELP = """fewshot: the k labelled support tiles, a JSON file or JSON text, either
{"labels": RASTER, "tiles": [TILE_ID, ...]} (one label raster for all) or
[{"tile": TILE_ID, "labels": RASTER, "cube": CUBE}, ...] (pairs; "cube" optional, default --cube).
Label rasters: class ids in any CRS / resolution, 255 = unlabelled, class names from their class_names tag.
Paths in a file are relative to it."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cube", required=True, help="the Zarr cube (jobs/ingest.py): a path or an s3:// URL")
    p.add_argument("--checkpoint", required=True,
                   help="landcover: fine-tune run dir or its head.safetensors; fewshot/embeddings: an encoder")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True,
                   help="the product COG (.tif), a path or an s3:// URL; OUT.png and OUT.json are written beside it")
    p.add_argument("--support", default=None, help=SUPPORT_HELP)
    p.add_argument("--window", type=int, default=None,
                   help="the largest window in S2 pixels (multiple of 4; default: per preset, tiny 256 i.e. a whole "
                        "tile, huge 32; fewshot 32)")
    p.add_argument("--overlap", type=int, default=None,
                   help="overlap of neighbouring windows inside a tile in S2 px (default 4)")
    p.add_argument("--margin", type=int, default=None,
                   help="S2 px of context around each tile core that is predicted and dropped (default 8, at most "
                        "the cube's halo)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (gathered across tiles)")
    p.add_argument("--gpu", action="store_true", help="one GPU per inference actor, bf16 autocast")
    p.add_argument("--crs", default=None,
                   help="CRS of the mosaic: an EPSG code (e.g. 3035) or any CRS string; default the AOI's UTM zone")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (tiles done earlier are reused)")
    p.add_argument("--allow-partial", action="store_true",
                   help="make the product and exit 0 even when tiles failed (they are nodata)")
    p.add_argument("--name", default=None, help="name of the per-tile directory (default: OUT's stem + '.tiles')")
    p.add_argument("--work-dir", default=None, help="where the per-tile directory lives, a path or an s3:// URL "
                   "(default: OUT's directory)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster: an address, 'auto' or 'local'. Default: RAY_ADDRESS if set, else a local Ray")
    p.add_argument("--num-actors", type=int, default=None,
                   help="inference actors at most (default: the GPUs with --gpu, else one per 8 CPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="Ray CPUs per inference actor (default: 1 with --gpu, else the cluster's CPUs less the "
                        "read share, split over the actors, at most the largest node's)")
    p.add_argument("--part-px", type=int, default=DEFAULT_PART_PX,
                   help="a product wider or taller than this many pixels is written as COG parts of this side "
                        "with a VRT joining them (OUT.vrt) and a STAC Collection (OUT.json) (default: "
                        f"{DEFAULT_PART_PX})")
    p.add_argument("--allow-href", action="append", default=[], metavar="DIR_OR_URL",
                   help="fewshot: a directory or URL prefix a --support FILE may point to beyond its own directory "
                        "(repeatable)")
    p.add_argument("--min-mapping-unit", type=float, default=0.0, metavar="M2",
                   help="class polygons: patches smaller than this many m² are merged into their neighbours first")
    p.add_argument("--simplify", type=float, default=0.0, metavar="M",
                   help="class polygons: vertex tolerance in metres (default 0: lossless, only collinear vertices "
                        "dropped; > 0 simplifies each polygon on its own, shared borders may then differ)")
    p.add_argument("--no-vectors", action="store_true", help="do not polygonise the class map (OUT.parquet)")
    p.add_argument("--no-report", action="store_true", help="do not write OUT.report.html")
    p.add_argument("--embedding-dtype", choices=("int8", "float32"), default="int8",
                   help="embeddings: int8 = the 64-d unit-vector field OUT.zarr (default); float32 = raw F_fus COG")
    p.add_argument("--embedding-cog", action="store_true",
                   help="embeddings with OUT.zarr: also write the int8 vectors as a COG (OUT's stem + .tif)")
    p.add_argument("--max-tiles", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop after N tiles
    p.add_argument("--write-pids", action="store_true", help=argparse.SUPPRESS)  # tests: actors write their pids
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = InferenceConfig(
        cube=a.cube, checkpoint=a.checkpoint, task=a.task, out=a.out, support=a.support, window=a.window,
        overlap=a.overlap, margin=a.margin, batch_size=a.batch_size, gpu=a.gpu, crs=a.crs, overwrite=a.overwrite,
        allow_partial=a.allow_partial, name=a.name, work_dir=a.work_dir, ray_address=a.ray_address,
        num_actors=a.num_actors, cpus_per_actor=a.cpus_per_actor, part_px=a.part_px, max_tiles=a.max_tiles,
        write_pids=a.write_pids, min_mapping_unit_m2=a.min_mapping_unit, simplify_m=a.simplify,
        vectors=not a.no_vectors,
        report=not a.no_report, allow_hrefs=tuple(a.allow_href), embedding_dtype=a.embedding_dtype,
        embedding_cog=a.embedding_cog,
    )
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  (stdout holds the JSON summary only)
    import ray

    ours = not ray.is_initialized()  # stop only a Ray this call started (never a caller's session)
    try:
        result = run_inference(cfg, progress=log)
    except (ValueError, FileExistsError, FileNotFoundError, zarr_cube.CubeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the run itself failed (Ray, the mosaic ...): tiles recorded so far stay recorded
        print(f"error: inference failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    print(json.dumps(result.summary()))
    if result.stopped_early:
        return 1
    if result.failed and not a.allow_partial:
        print(f"error: {len(result.failed)} tile(s) failed (see {result.manifest}); no product made",
              file=sys.stderr)
        return 1
    if result.out is None:
        print("error: no tile could be predicted; no product made", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

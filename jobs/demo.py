"""The main job, end to end on the embedded demo region (``make demo``).

Stages: build the demo region (a local static STAC catalog with S2, S1 and HR COGs and ground truth), search it
as the pipeline does, ingest it into a Zarr cube with Ray (out/demo/cube.zarr), pretrain the ``tiny`` model on it
with Ray Train (out/demo/runs/demo-tiny-stage1; its EMA teacher is exported), fine-tune a land-cover head on the
demo truth (out/demo/runs/demo-landcover-head; every 4th tile held out for testing, see pipeline.finetune) and
fit the raw-pixel baseline on the same pixels, predict the whole cube with sliding windows on Ray and mosaic it
into out/demo/landcover.tif (COG) with landcover.png (quicklook) and landcover.json (STAC item), and print the
map's mIoU and per-class IoU on the held-out tiles beside the baseline's, then the time of every stage.

    python jobs/demo.py --out out/demo [--size-km 5] [--seed 0] [--hr-ratio 8] [--force] [--pretrain-steps 20]
                        [--finetune-steps 60]

A re-run reuses what is there: the region, the finished cube tiles, the pretraining run, the fine-tuned head
and the predicted tiles (the product itself is remade).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


from pipeline import demo, stac  # noqa: E402
from pipeline.baselines import otsu_baseline, raw_pixel_baseline  # noqa: E402
from pipeline.cube import CubeConfig  # noqa: E402
from pipeline.evaluate import score_product  # noqa: E402
from pipeline.finetune import FinetuneConfig, file_sha256, finetune, read_head_info, run_finetune  # noqa: E402
from pipeline.grid import load_aoi, parse_tile_id  # noqa: E402
from pipeline.inference import InferenceConfig, run_inference  # noqa: E402
from pipeline.ingest import cube_summary, run_ingest  # noqa: E402
from pipeline.training import PretrainJobConfig, run_pretraining  # noqa: E402


def build_region(out: Path, cfg: demo.DemoConfig, force: bool) -> Path:
    """The demo catalog under ``out/region``, regenerated only if missing or made with another config."""
    region = out / "region"
    catalog = region / "catalog.json"
    truth = region / "truth" / "truth.json"
    if catalog.exists() and truth.exists() and not force:
        made_with = json.loads(truth.read_text())["config"]
        if all(made_with.get(k) == v for k, v in asdict(cfg).items() if not isinstance(v, tuple)):
            print(f"demo region exists: {catalog} (use --force to rebuild)")
            return catalog
    return demo.generate(cfg, region)


def _iou_line(names: list[str], ious) -> str:
    return "  ".join(f"{n} {'  n/a' if v is None or v != v else f'{v:.3f}'}" for n, v in zip(names, ious, strict=True))


def landcover_product(out: Path, cube: Path, encoder: Path, steps: int, cube_cfg: CubeConfig,
                      timing: dict[str, float]) -> Path | None:
    """Fine-tune the land-cover head on the demo truth (pipeline.finetune's recipe: frozen encoder, per-date
    features by month plus the input, linear head by L-BFGS), fit the raw-pixel baseline on the same training
    pixels, predict the cube into ``out/landcover.tif`` and print, for the held-out tiles, the map's mIoU and
    per-class IoU beside the baseline's. None (after printing why) when the inference left tiles undone."""
    truth = out / "region" / "truth" / "landcover_10m.tif"
    head_dir = out / "runs" / "demo-landcover-head"
    baseline_file = head_dir / "baseline.json"
    try:
        info = read_head_info(head_dir)
        reuse = info.encoder_sha256 == file_sha256(encoder) and info.features == "dates+input" \
            and baseline_file.exists()  # the head fits these very weights, made by this recipe
    except ValueError:
        reuse = False
    t0 = time.perf_counter()
    if reuse:
        print(f"\nfine-tune: reusing the head in {head_dir}")
        metrics = json.loads((head_dir / "metrics.json").read_text())
        baseline = json.loads(baseline_file.read_text())
    else:
        print(f"\nfine-tune the land-cover head (frozen encoder, features by month + input, linear) -> {head_dir}")
        metrics, feats = finetune(FinetuneConfig(cube=str(cube), labels=str(truth), checkpoint=str(encoder),
                                                 out=str(head_dir), steps=steps), log=lambda s: print("  " + s))
        baseline = raw_pixel_baseline(feats["train"].inputs, feats["train"].y, feats["held_out"].inputs,
                                      feats["held_out"].y, metrics["num_classes"])
        baseline_file.write_text(json.dumps(baseline, indent=2))
    timing["fine-tune"] = time.perf_counter() - t0

    product = out / "landcover.tif"
    print(f"\ninfer -> {product}")
    # The default window plan: for tiny one window per tile, the 128 px core and 8 px of context around it
    # (pipeline.inference.PRESET_WINDOW, DEFAULT_MARGIN); the bounded HR global attention keeps the cost per pixel
    # independent of the window.
    t0 = time.perf_counter()
    result = run_inference(InferenceConfig(cube=str(cube), checkpoint=str(head_dir), task="landcover",
                                           out=str(product), overwrite=True))
    timing["inference"] = time.perf_counter() - t0
    if not result.complete:
        print(f"inference left {len(result.failed)} tile(s) undone: {result.failed}")
        return None
    score = score_product(product, truth)
    held_out = metrics["val_tiles"]  # the fine-tuning's test tiles (pipeline.finetune.split_for_finetune)
    import rasterio

    with rasterio.open(product) as src:
        windows = [src.window(*parse_tile_id(t, cube_cfg.grid).core_bounds()) for t in held_out]
    held = score_product(product, truth, windows=windows)
    n_px = len(result.processed) * cube_cfg.grid.tile_px ** 2
    rate = f", {result.seconds['pipeline'] / n_px * 1e3:.3f} ms per 10 m pixel" if n_px else " (tiles reused)"
    print(f"  {product}: inference of {len(result.processed)} tiles {result.seconds['pipeline']:.1f} s{rate}, "
          f"mosaic {result.seconds['mosaic']:.1f} s, total {result.seconds['total']:.0f} s; quicklook "
          f"{result.quicklook.name}, STAC item {result.item.name}")
    names = metrics["class_names"]
    print(f"\nland cover on the {len(held_out)} held-out tiles ({', '.join(held_out)}), "
          f"{held.pixels} pixels, against the demo truth:")
    print(f"  model    (the map, {metrics['encoder'].split('/')[-2]} encoder frozen, head {metrics['head']} on "
          f"'{metrics['features']}' features): mIoU {held.miou:.3f}, pixel accuracy {held.pixel_accuracy:.3f}")
    print(f"           {_iou_line(names, held.iou)}")
    print(f"  baseline (raw pixels: monthly S2/S1 means + HR statistics, {baseline['classifier']}, the same "
          f"{baseline['train_pixels']} training pixels): mIoU {baseline['miou']:.3f}, pixel accuracy "
          f"{baseline['pixel_accuracy']:.3f}")
    print(f"           {_iou_line(names, baseline['per_class_iou'])}")
    margin = held.miou - baseline["miou"]
    verdict = "a tie" if abs(margin) < 5e-4 else "the model wins" if margin > 0 else "the baseline wins"
    print(f"  model - baseline: {margin:+.3f} mIoU ({verdict}); "
          f"all {len(result.done)} tiles: mIoU {score.miou:.3f} (training tiles included)")
    _print_calibration(metrics)
    _products_line(product)
    rows = [{"name": "mIoU", "model": held.miou, "baseline": baseline["miou"]},
            {"name": "pixel accuracy", "model": held.pixel_accuracy, "baseline": baseline["pixel_accuracy"]}]
    rows += [{"name": f"IoU {n}", "model": m, "baseline": b}
             for n, m, b in zip(names, held.iou, baseline["per_class_iou"], strict=True)]
    _score_report(product, rows, "raw-pixel baseline (logistic regression)",
                  f"demo truth on the {len(held_out)} held-out tiles ({held.pixels} pixels)")
    return product


def _print_calibration(metrics: dict) -> None:
    """The confidence band's calibration on the held-out tiles (pipeline.calibration), if the head has one."""
    cal = metrics.get("calibration")
    if not cal:
        return
    print(f"  confidence (uint8 percent of the top class): temperature {cal['temperature']:.3f} fitted on the "
          f"{cal['fitted_on']}; held-out expected calibration error {cal['ece_uncalibrated']:.4f} uncalibrated -> "
          f"{cal['ece_calibrated']:.4f} calibrated (accuracy {cal['held_out_accuracy']:.3f}, mean confidence "
          f"{cal['mean_confidence_calibrated']:.3f})")


def _products_line(product: Path) -> None:
    """Which files beside the COG make the product (confidence, polygons, report)."""
    made = [p.name for p in (product.with_name(f"{product.stem}.confidence.tif"), product.with_suffix(".parquet"),
                             product.with_name(f"{product.stem}.report.html")) if p.exists()]
    print(f"  beside {product.name}: {', '.join(made)}")


def _score_report(product: Path, rows: list[dict], baseline_name: str, truth_name: str) -> None:
    """Re-render the product's report with the scores against truth, the baseline beside the model."""
    from pipeline.report import update_report

    html = product.with_name(f"{product.stem}.report.html")
    if html.exists():
        update_report(html, metrics=rows, baseline_name=baseline_name, truth_name=truth_name)
        print(f"  report with the scores: {html}")


def flood_scores(out: Path, cube: Path, encoder: Path, steps: int, dcfg: demo.DemoConfig,
                 timing: dict[str, float]) -> dict:
    """The flood classes of the demo event from the model (a head fine-tuned on the flood truth by the same recipe,
    on the series up to the event date: nothing observed later is used) against the per-tile Otsu baseline on
    the same held-out tiles and dates; prints mIoU and per-class IoU of both. The scores are of the head on the
    cached held-out features, which are what inference computes (tests/test_finetune.py checks the agreement)."""
    fd = dcfg.flood_date()
    truth = out / "region" / "truth" / f"flood_{fd:%Y%m%d}.tif"
    event = fd.timetuple().tm_yday
    head_dir = out / "runs" / "demo-flood-head"
    t0 = time.perf_counter()
    try:
        info = read_head_info(head_dir)
        reuse = info.encoder_sha256 == file_sha256(encoder) and (head_dir / "otsu.json").exists()
    except ValueError:
        reuse = False
    if reuse:
        print(f"\nflood: reusing the head in {head_dir}")
        metrics = json.loads((head_dir / "metrics.json").read_text())
        otsu = json.loads((head_dir / "otsu.json").read_text())
    else:
        print(f"\nflood of {fd} (S1 day {event}): fine-tune a flood head on the series up to the event -> {head_dir}")
        metrics = run_finetune(FinetuneConfig(cube=str(cube), labels=str(truth), checkpoint=str(encoder),
                                              out=str(head_dir), steps=steps, until_doy=event),
                               log=lambda s: print("  " + s))
        otsu = otsu_baseline(cube, truth, metrics["val_tiles"], until_doy=event)
        (head_dir / "otsu.json").write_text(json.dumps(otsu, indent=2))
    # the model's flood map of the held-out tiles through the inference pipeline (the head carries its as-of day)
    product = out / "flood.tif"
    result = run_inference(InferenceConfig(cube=str(cube), checkpoint=str(head_dir), task="landcover",
                                           out=str(product), tiles=list(metrics["val_tiles"]), overwrite=True),
                           progress=None)
    timing["flood"] = time.perf_counter() - t0
    names = metrics["class_names"]
    if result.complete:
        mapped = score_product(product, truth)
        print(f"\nflood map {product} ({len(result.done)} held-out tiles; quicklook {result.quicklook.name}, STAC "
              f"item {result.item.name}): mIoU {mapped.miou:.3f} against the truth")
    print(f"\nflood on the {len(metrics['val_tiles'])} held-out tiles, {metrics['val_pixels']} pixels, against the "
          f"demo flood truth of {fd}:")
    print(f"  model (head {metrics['head']} on '{metrics['features']}' features up to day {event}): "
          f"mIoU {metrics['miou']:.3f}")
    print(f"           {_iou_line(names, list(metrics['per_class_iou'].values()))}")
    print(f"  Otsu  ({otsu['classifier']}): mIoU {otsu['miou']:.3f}")
    print(f"           {_iou_line(names, otsu['per_class_iou'])}")
    margin = metrics["miou"] - otsu["miou"]
    verdict = "a tie" if abs(margin) < 5e-4 else "the model wins" if margin > 0 else "Otsu wins"
    print(f"  model - Otsu: {margin:+.3f} mIoU ({verdict})")
    _print_calibration(metrics)
    if result.complete:
        _products_line(product)
        rows = [{"name": "mIoU", "model": metrics["miou"], "baseline": otsu["miou"]}]
        rows += [{"name": f"IoU {n}", "model": m, "baseline": b}
                 for n, m, b in zip(names, metrics["per_class_iou"].values(), otsu["per_class_iou"], strict=True)]
        _score_report(product, rows, f"Otsu ({otsu['classifier']})",
                      f"demo flood truth of {fd}, {metrics['val_pixels']} held-out pixels")
    return {"model": metrics["miou"], "otsu": otsu["miou"]}


MIN_SIZE_KM = 2.0  # [ours] 2 x 2 tiles of 1.28 km: the smallest region with training and held-out tiles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", type=Path)
    p.add_argument("--size-km", type=float, default=demo.DemoConfig.size_km)
    p.add_argument("--seed", type=int, default=demo.DemoConfig.seed)
    p.add_argument("--hr-ratio", type=int, default=demo.DemoConfig.hr_ratio)
    p.add_argument("--force", action="store_true", help="rebuild the demo region even if it exists")
    p.add_argument("--pretrain-steps", type=int, default=20,
                   help="stage-1 steps of the tiny preset on the demo cube (0 skips pretraining and what follows)")
    p.add_argument("--finetune-steps", type=int, default=FinetuneConfig.steps,
                   help="L-BFGS iterations of the land-cover head (0 skips fine-tuning, inference and scoring)")
    args = p.parse_args(argv)
    if args.size_km < MIN_SIZE_KM:
        p.error(f"--size-km {args.size_km}: the demo needs at least {MIN_SIZE_KM} km (tiles to train on and to hold "
                "out)")
    try:
        cfg = demo.DemoConfig(size_km=args.size_km, seed=args.seed, hr_ratio=args.hr_ratio)
    except ValueError as e:
        p.error(str(e).replace("size_km", "--size-km").replace("seed", "--seed").replace("hr_ratio", "--hr-ratio"))
    out = args.out.resolve()
    if out.exists() and not out.is_dir():
        p.error(f"--out {args.out} is a file, not a directory")
    parent = next(q for q in [out, *out.parents] if q.exists())
    if not os.access(parent, os.W_OK):
        p.error(f"--out {args.out}: {parent} is not writable")
    t0 = time.time()
    timing: dict[str, float] = {}
    t_stage = time.perf_counter()
    catalog = build_region(args.out, cfg, args.force)
    timing["region"] = time.perf_counter() - t_stage

    source = stac.open_source(catalog)
    bbox = list(demo.region_bbox(cfg))
    print(f"\nsearch {catalog}")
    print(f"  bbox {[round(v, 4) for v in bbox]}, datetime {cfg.year}, collections {source.collection_ids()}")
    items = stac.search(source, bbox=bbox, datetime=str(cfg.year))
    for line in stac.summarize(items):
        print("  " + line.line())
    clear = stac.search(
        source,
        collections=["sentinel-2-l2a"],
        bbox=bbox,
        datetime=f"{cfg.year}-04/{cfg.year}-09",
        query={"eo:cloud_cover": {"lt": 10}},
        allow_empty=True,
    )
    print(f"  sentinel-2 April-September with eo:cloud_cover < 10%: {len(clear)} items")

    # Ingest: the whole region and year into a Zarr v3 cube (re-runs skip finished tiles).
    cube = args.out / "cube.zarr"
    print(f"\ningest -> {cube}")
    t_stage = time.perf_counter()
    cube_cfg = CubeConfig(hr_ratio=cfg.hr_ratio)
    report = run_ingest(str(catalog), load_aoi(bbox), date(cfg.year, 1, 1), date(cfg.year, 12, 31), cube, cube_cfg)
    print(cube_summary(cube))
    timing["ingest"] = time.perf_counter() - t_stage
    if not report.ok:
        return 1

    # Pretraining: SkySense stage 1 of the tiny preset on the cube with Ray Train (a re-run continues the run
    # and stops at the same step count, so it only re-exports the weights).
    run = None
    if args.pretrain_steps > 0:
        job = PretrainJobConfig(cube=str(cube), preset="tiny", stage=1, steps=args.pretrain_steps, batch_size=4,
                                workers=1, out=str(args.out / "runs"), name="demo-tiny-stage1",
                                checkpoint_every=max(args.pretrain_steps // 2, 1), warmup=2)
        print(f"\npretrain -> {job.run_dir}")
        t_stage = time.perf_counter()
        run_pretraining(job)
        timing["pretrain"] = time.perf_counter() - t_stage
        run = job.run_dir
    landcover = None
    if run is not None and args.finetune_steps > 0:
        landcover = landcover_product(args.out, cube, run / "model.safetensors", args.finetune_steps, cube_cfg,
                                      timing)
        if landcover is None:
            return 1
        flood_scores(args.out, cube, run / "model.safetensors", args.finetune_steps, cfg, timing)
    print("\ntime per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()))
    print(f"\ndemo done in {time.time() - t0:.1f} s: {len(items)} items in {catalog}, cube {cube}"
          + (f", pretrained weights {run / 'model.safetensors'}" if run else "")
          + (f", land cover {landcover}" if landcover else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``--train fusion``: the fusion and the day-of-year encoding fine-tuned on cached encoder outputs.

With the encoders frozen, what they make of a tile never changes, and SkySense's fusion attends over one
location's dates only. So the encoders run once over every training and selection tile (:func:`cache_sequences`,
with the inference window plan of ``pipeline.inference.feature_spec``: the windows, margin and context the
model will see at inference), and each sampled labelled pixel keeps its bare fusion input (date tokens, keep
mask, days of year: ``SkySense.fusion_sequence(..., dated=False)``), its tile centre (geo-context) and the frozen
rest of its feature stack (``dates`` / ``dates+input``). Training (:func:`train_fusion`) then runs the fusion
alone on minibatches of pixels drawn across all training tiles, as the head's fit does, which is what makes a
step cheap: on ``tiny`` the encoders are most of a forward.

:func:`run_fusion_finetune` is the phase ``pipeline.finetune.finetune`` calls: cache, train, keep the step with
the best selection mIoU, and write the model with its trained fusion to ``OUT/model/model.safetensors``; the
head is then fitted on that model's features like any frozen encoder's. ``--train all`` (the encoders too)
cannot cache and runs on Ray Train instead (``pipeline.finetune.run_finetune_train``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.datasource import rows_to_input, until
from pipeline.labels import NODATA

MODEL_DIR = "model"
SELECT_PIXELS = 8192  # labelled pixels per selection tile, as the head's selection set [ours]


@dataclass
class SequenceSet:
    """Cached fusion inputs of sampled labelled pixels: ``seq`` (N, L, C) float32 bare date tokens, ``keep``
    (N, L) bool, ``doy`` (N, L) int64 (0: no date encoding), ``lat`` / ``lon`` (N,) float32 degrees of the
    pixel's tile centre, ``frozen`` (N, F_frozen) float32 the frozen rest of the feature stack, ``y`` (N,)
    int64 labels, ``tile`` (N,) index into ``tiles``."""

    tiles: list[str]
    seq: torch.Tensor
    keep: torch.Tensor
    doy: torch.Tensor
    lat: torch.Tensor
    lon: torch.Tensor
    frozen: torch.Tensor
    y: torch.Tensor
    tile: torch.Tensor

    def inputs(self, idx: torch.Tensor | slice, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The model inputs of the pixels ``idx`` (``CachedFusionFinetuner.features`` order) on ``device``."""
        return tuple(t[idx].to(device) for t in (self.seq, self.keep, self.doy, self.lat, self.lon, self.frozen))

    def __len__(self) -> int:
        return len(self.y)


def window_owner(windows: Sequence[tuple[int, int, int, int]], size: int) -> np.ndarray:
    """(size, size) int: the index of the window whose Hann weight is largest at each pixel (-1: none covers
    it), i.e. the window whose prediction counts most there in ``TilePredictor``'s blend: each cached pixel is
    encoded with the context it is mostly predicted from."""
    from pipeline.inference import hann_window

    best = np.zeros((size, size), np.float32)
    owner = np.full((size, size), -1, np.int64)
    for i, (y, x, h, w) in enumerate(windows):
        wgt = hann_window(h, w)
        cur = best[y:y + h, x:x + w]
        take = wgt > cur
        cur[take] = wgt[take]
        owner[y:y + h, x:x + w][take] = i
    return owner


def cache_sequences(model, cube: str, labels: str, tiles: Sequence[str], spec, features: str, sample: int,
                    seed: int = 0, until_doy: int | None = None,
                    log: Callable[[str], None] = print) -> SequenceSet:
    """Run the frozen encoders of ``model`` (eval mode, on its device) once over every tile of ``tiles`` with
    the window plan of ``spec`` (a ``pipeline.inference.PredictorSpec``) and keep, for at most ``sample`` random
    labelled valid pixels of each tile core, what :class:`SequenceSet` holds."""
    from pipeline.inference import read_tiles_local, valid_pixels, window_batch
    from skysense_core.pixel_features import pixel_features

    device = next(model.parameters()).device
    c0, n = spec.core
    windows = spec.windows()
    owner = window_owner(windows, spec.size)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("seq", "keep", "doy", "lat", "lon", "frozen", "y",
                                                              "tile")}
    t0 = time.perf_counter()
    reads = read_tiles_local(cube, list(tiles), modalities=spec.modalities, labels=labels)
    model.eval()
    for i, (t, batch) in enumerate(zip(tiles, reads, strict=True)):
        if str(batch["tile_id"][0]) != t:
            raise RuntimeError(f"tile order: expected {t}, read {batch['tile_id'][0]}")
        row = {k: v[0] for k, v in until(batch, until_doy).items()}
        lab = np.asarray(row["labels_grid"]).astype(np.int64)
        ok = np.zeros_like(lab, dtype=bool)
        ok[c0:c0 + n, c0:c0 + n] = True
        ok &= (lab != NODATA) & valid_pixels(row, spec.modalities, spec.hr_ratio) & (owner >= 0)
        idx = np.flatnonzero(ok.ravel())
        if len(idx) > sample:
            idx = np.sort(rng.choice(idx, sample, replace=False))
        py, px = np.divmod(idx, spec.size)
        for w_i in np.unique(owner.ravel()[idx]):
            y0, x0, h, w = windows[w_i]
            mine = owner.ravel()[idx] == w_i
            yy, xx = torch.from_numpy(py[mine] - y0), torch.from_numpy(px[mine] - x0)
            cols = window_batch(row, [(y0, x0)], (h, w), spec.hr_ratio, spec.modalities)
            x_in, _ = rows_to_input(cols, spec.modalities)
            with torch.inference_mode():
                x_in = x_in.to(device)
                enc = model.encode(x_in)
                seq, keep, doy = model.fusion_sequence(enc, dated=False)  # (1, h, w, L, C), ...
                pieces = pixel_features(features, model.fuse(enc, x_in), x_in, spec.hr_ratio, parts=True)
                frozen = torch.cat([p[0] for p in pieces[1:]], 0) if len(pieces) > 1 else seq.new_zeros((0, h, w))
            parts["seq"].append(seq[0, yy, xx].float().cpu())
            parts["keep"].append(keep[0, yy, xx].cpu())
            parts["doy"].append(doy[0, yy, xx].cpu())
            parts["frozen"].append(frozen[:, yy, xx].T.float().cpu())
            parts["lat"].append(torch.full((len(yy),), float(row["lat"])))
            parts["lon"].append(torch.full((len(yy),), float(row["lon"])))
            parts["y"].append(torch.from_numpy(lab[py[mine], px[mine]]))
            parts["tile"].append(torch.full((len(yy),), i, dtype=torch.int64))
        if (i + 1) % 5 == 0 or i + 1 == len(tiles):
            log(f"[finetune] encoder outputs of {i + 1}/{len(tiles)} tiles cached, {time.perf_counter() - t0:.0f} s")
    return SequenceSet(list(tiles), **{k: torch.cat(v) for k, v in parts.items()})


def train_fusion(cfg, model, train: SequenceSet, select: SequenceSet | None, num_classes: int,
                 log: Callable[[str], None] = print) -> dict:
    """Train ``model``'s fusion and date encoding in place (``skysense_core.segmentation.CachedFusionFinetuner``)
    for ``cfg.model_steps`` AdamW steps of ``cfg.batch_size`` pixels drawn across all training tiles, peak
    learning rate ``cfg.model_lr`` for the model's parts and ``cfg.lr`` for the training classifier, warm-up
    then cosine (``pipeline.training.lr_lambda``); evaluated every tenth of the run on the selection pixels and
    the best step's fusion kept. Returns the training record."""
    from pipeline.finetune import confusion, scores
    from pipeline.training import lr_lambda
    from skysense_core.segmentation import CachedFusionFinetuner

    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    module = CachedFusionFinetuner(model, num_classes, train.frozen.shape[1]).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": trained, "lr": cfg.model_lr, "weight_decay": cfg.weight_decay},
        {"params": list(module.classifier.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
    ])
    steps = cfg.model_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(steps // 10, 1), steps))
    every = max(steps // 10, 1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    best = {"miou": -1.0, "step": 0, "state": {n: p.detach().clone() for n, p in model.named_parameters()
                                               if n in names}}
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        module.train()
        idx = torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=g)
        loss, logs = module(*train.inputs(idx, device), train.y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 3.0)
        opt.step()
        sched.step()
        if step % every and step != steps:
            continue
        module.eval()
        miou = float(step)  # no selection tiles (a tiny cube): the last step is kept
        if select is not None and len(select):
            cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
            with torch.inference_mode():
                for i in range(0, len(select), 16384):
                    sl = slice(i, i + 16384)
                    cm += confusion(module.logits(*select.inputs(sl, device)).argmax(1).cpu(), select.y[sl],
                                    num_classes)
            miou = scores(cm, truth_classes_only=True)["miou"]
        curve.append({"step": step, "loss": logs["loss"], "select_miou": miou})
        if miou > best["miou"]:
            best = {"miou": miou, "step": step, "state": {n: p.detach().clone() for n, p in
                                                          model.named_parameters() if n in names}}
        log(f"[finetune] fusion step {step}/{steps} loss {logs['loss']:.4f} selection mIoU {miou:.3f} "
            f"(best {best['miou']:.3f} at {best['step']}), {time.perf_counter() - t0:.0f} s")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in best["state"]:
                p.copy_(best["state"][n])
    for p in model.parameters():
        p.requires_grad_(True)
    return {"model_best_step": best["step"], "model_select_miou": best["miou"] if select is not None else None,
            "model_curve": curve, "model_steps": steps, "model_seconds_train": time.perf_counter() - t0}


def run_fusion_finetune(cfg, train_tiles: Sequence[str], select_tiles: Sequence[str], num_classes: int | None,
                        log: Callable[[str], None] = print) -> tuple[str, dict]:
    """The ``train="fusion"`` phase of ``pipeline.finetune.finetune`` (module docstring): returns the path of the
    model with its trained fusion (``OUT/model/model.safetensors``) and a record for the metrics."""
    from pipeline.inference import feature_spec
    from skysense_core.checkpoint import load_checkpoint, save_checkpoint

    if cfg.workers > 1:
        log(f"[finetune] --train fusion trains on cached encoder outputs in this process; --workers {cfg.workers} "
            "applies to --train all")
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = torch.device("cuda" if cfg.gpu else "cpu")
        model, _, meta = load_checkpoint(cfg.checkpoint)
        model = model.to(device)
        spec = feature_spec(cfg.cube, cfg.checkpoint, cfg.features, threads=cfg.threads)
        common = {"spec": spec, "features": cfg.features, "seed": cfg.seed, "until_doy": cfg.until_doy, "log": log}
        train = cache_sequences(model, cfg.cube, cfg.labels, train_tiles, sample=cfg.pixels_per_tile, **common)
        select = cache_sequences(model, cfg.cube, cfg.labels, select_tiles, sample=SELECT_PIXELS,
                                 **common) if select_tiles else None
        t_cache = time.perf_counter() - t0
        if num_classes is None:
            num_classes = int(train.y.max()) + 1
        record = train_fusion(cfg, model, train, select, num_classes, log=log)
    finally:
        torch.set_num_threads(threads_before)
    path = Path(cfg.out).resolve() / MODEL_DIR / "model.safetensors"
    meta = {**copy.deepcopy(meta), "finetuned": {"train": "fusion", "from": str(Path(cfg.checkpoint).resolve()),
                                                 "steps": cfg.model_steps, "best_step": record["model_best_step"]}}
    save_checkpoint(path, model.cpu(), meta=meta)
    record.update({"model_run": str(path.parent), "model_cached_pixels": len(train),
                   "model_seconds_cache": t_cache, "model_seconds": time.perf_counter() - t0})
    return str(path), record

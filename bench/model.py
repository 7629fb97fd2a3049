"""Benchmark: the SkySense model (``skysense_core``) forward and forward+backward, per preset, against a plain
square matmul of the same FLOPs measured in the same run.

Prints one JSON object per line. Input ("the documented input size"): every modality present, every date
valid, masks all True (``tests.model_inputs.make_batch``, physical units, lat/lon spread over the globe): a
``--grid`` x ``--grid`` Sentinel grid (default 16, the paper's S2/S1 16 x 16 patch) with ``--t-s2`` S2 dates
(default 20), ``--t-s1`` S1 dates (default 10) and ``--t-hr`` HR dates (default 1); the HR side is
``grid * cfg.hr_ratio``: 512 x 512 for small / base / huge (hr_ratio 32, the paper's sample), 128 x 128 for
tiny (hr_ratio 8). Batch ``--batch`` (default 2; 1 for ``huge`` on CUDA). The actual sizes are in every line.

For each preset and each mode a fresh subprocess (this script with the hidden ``--worker``) runs:

1. ``torch.manual_seed(0)``; ``build_model(preset, device)``; ``params`` = parameters, ``bank_numel`` = the
   geo-context prototype bank's buffer elements (``glbank``, not parameters, counted separately).
2. The mode's step, ``forward``: eval mode, ``torch.no_grad()``, ``model(batch)``; or ``forward_backward``:
   train mode, ``zero_grad(set_to_none=True)``, ``loss = out.fused.float().pow(2).mean()``, ``loss.backward()``.
   With ``--dtype bf16`` the forward and the loss run under ``torch.autocast(device, dtype=torch.bfloat16)``
   (default dtype: fp32 on CPU, bf16 on CUDA; fp32 on CUDA means full fp32 matmuls, TF32 off as torch defaults).
3. One step under ``torch.utils.flop_counter.FlopCounterMode`` (it doubles as the first warm-up): FLOPs per
   iteration (= per batch) and per sample. FlopCounterMode counts matmul / conv / SDPA FLOPs only, the ops
   that dominate (norms, softmax, GELU, elementwise ops are not counted); the CPU fused attention
   (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which torch's table lacks, is counted
   here with torch's own SDPA formulas. In forward lines ``flops_by_module`` splits the count over the
   top-level submodules (not in forward_backward lines: torch's ModuleTracker attributes backward FLOPs to
   several modules at once there).
4. ``--warmup`` (default 1) more untimed steps. Peak memory is read now, before the matmul reference below
   allocates anything. CPU: ``peak_rss_mib`` = the subprocess's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``:
   interpreter, torch, model, inputs and the steps), and ``peak_rss_delta_mib`` = that minus its RSS right
   after imports and model build (``rss_after_build_mib``; what inputs and the step added at their peak). CUDA:
   ``peak_cuda_mib`` = ``torch.cuda.max_memory_allocated`` (weights included) and ``peak_cuda_delta_mib`` = that
   minus the memory allocated after the build; host peak RSS is reported too.
5. The practical limit: a square ``n x n`` matmul (``torch.mm`` into a preallocated output) in the run's dtype
   (fp32 on CPU, bf16 with ``--dtype bf16``), called ``k`` times per iteration with ``k * 2 n^3`` as close as
   possible to the step's FLOPs (n a multiple of 64 near cbrt(FLOPs / 2), capped at 2048 on CPU and 8192 on
   CUDA; ``matmul_n``, ``matmul_k``, ``matmul_flops_per_iter`` in the line). One warm-up iteration of it, then
   ``--iters`` timed iterations of the model step, each followed by one timed matmul iteration (interleaved, so
   that both see the same load on a shared machine): ``time.perf_counter`` around each, with
   ``torch.cuda.synchronize()`` before and after on CUDA.
6. ``seconds_per_iter`` = mean over the timed model iterations (``min_seconds_per_iter`` too),
   ``samples_per_s = batch / seconds_per_iter``, ``achieved_flops_per_s = flops_per_iter / seconds_per_iter``;
   ``matmul_flops_per_s`` likewise; ``ratio_to_matmul = achieved_flops_per_s / matmul_flops_per_s`` is the
   fraction of the machine's practical limit the model reaches.
7. CUDA only: ``mfu = achieved_flops_per_s / peak_flops``, ``peak_flops`` = the GPU's dense bf16 peak from a
   small table (H100 SXM 989e12, H100 PCIe 756e12, H200 989e12, A100 312e12; ``null`` and no ``mfu`` for a
   GPU not in it), for either dtype.

Parameter breakdown (no compute: ``huge`` built on the meta device), printed last whenever ``huge`` is among
the presets, with ``--param-breakdown``, and always on CPU: parameters per top-level submodule, the geo
prototype bank buffer, totals with and without the bank, and the paper's 2.06e9 for comparison.

FLOPs per 10 m output pixel (``--per-pixel``): for each preset, one inference forward (eval, batch 1, every
date valid, the ``--grid`` window, default 16 = one block of the bounded HR global attention, the official input)
per modality mix (HR+S2+S1 and S2+S1 only) under the same FlopCounterMode, divided by the window's pixels, with
the FLOPs per top-level module. ``km2_per_gpu_hour`` turns that into area: ``--utilisation`` (default 0.4, ours)
of an H100's dense bf16 peak (989e12 FLOP/s) / FLOPs per pixel x 3600 s / 1e4 pixels per km^2. Window overlaps
and the margin around tiles add to this (``bench/infer.py`` measures them); the mosaic and I/O are not in it.

    python bench/model.py [--presets tiny small base] [--batch N] [--grid G] [--t-s2 T] [--t-s1 T] [--t-hr T]
                          [--iters N] [--warmup N] [--device cpu|cuda] [--dtype fp32|bf16] [--threads N]
                          [--grad-checkpointing] [--param-breakdown] [--per-pixel [--utilisation U]]

``huge`` on CUDA runs without activation checkpointing unless ``--grad-checkpointing``
(``model.set_grad_checkpointing(True)``, forward_backward only). ``huge`` on CPU is possible but slow (minutes
per step). A worker that fails (an error, out of memory) prints a line with ``error`` and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
MODES = ("forward", "forward_backward")
PAPER_PARAMS = 2.06e9
BREAKDOWN_MODULES = (
    "backbone_hr", "backbone_s2", "backbone_s1", "head_s2", "head_s1", "modality_vae", "fusion", "ctpe",
    "head_rec_hr", "head_rec_grid",
)


def gpu_peak_bf16(name: str) -> float | None:
    """Dense bf16 peak FLOP/s by GPU name (``torch.cuda.get_device_name``), None if not in the table."""
    n = name.upper()
    if "H200" in n:
        return 989e12
    if "H100" in n:
        if "PCIE" in n:
            return 756e12
        if "SXM" in n or "HBM3" in n:  # the SXM part reports itself as "NVIDIA H100 80GB HBM3"
            return 989e12
        return None  # NVL and other variants: not in the table
    if "A100" in n:
        return 312e12
    return None


def default_batch(preset: str, device: str) -> int:
    return 1 if preset == "huge" and device == "cuda" else 2


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def log(msg: str) -> None:
    print(f"[bench/model] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- FLOPs


def flop_counter():
    """FlopCounterMode with the CPU fused attention counted (torch's table only has the CUDA SDPA kernels)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = cpu_sdpa_backward
    return FlopCounterMode(display=False, depth=2, custom_mapping=mapping)


def flops_by_module(counter, root: str) -> dict[str, int]:
    """Top-level submodules' FLOPs from a FlopCounterMode's per-module table (keys ``Root.child``)."""
    out = {}
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == root:
            out[parts[1]] = int(sum(ops.values()))
    return out


# ------------------------------------------------------------------------------------------------- worker


def make_inputs(cfg, batch: int, grid: int, times: dict, device):
    from tests.model_inputs import make_batch

    lat = [-60.0 + 120.0 * (i + 0.5) / batch for i in range(batch)]
    lon = [-180.0 + 360.0 * (i + 0.5) / batch for i in range(batch)]
    x = make_batch(("hr", "s2", "s1"), batch=batch, grid=grid, hr_ratio=cfg.hr_ratio, seed=0, times=times,
                   lat=lat, lon=lon)
    return x.to(device)


def timed(step, iters: int, sync) -> list[float]:
    out = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def matmul_reference(flops: float, dtype, device):
    """A step of k calls of an n x n matmul, k * 2 n^3 ~ flops, and its description."""
    import torch

    cap = 8192 if device.type == "cuda" else 2048
    n = int(round((max(flops, 1.0) / 2) ** (1 / 3) / 64)) * 64
    n = min(max(n, 128), cap)
    k = max(1, round(flops / (2 * n**3)))
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), generator=g, device=device, dtype=dtype)
    b = torch.randn((n, n), generator=g, device=device, dtype=dtype)
    c = torch.empty((n, n), device=device, dtype=dtype)

    def step():
        for _ in range(k):
            torch.mm(a, b, out=c)

    return step, {"matmul_n": n, "matmul_k": k, "matmul_flops_per_iter": 2 * n**3 * k}


def worker(args) -> int:
    import torch

    import skysense_core

    if args.threads:
        torch.set_num_threads(args.threads)
    preset, mode = args.worker, args.worker_mode
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batch_size = args.batch or default_batch(preset, args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def amp():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    torch.manual_seed(0)
    model = skysense_core.build_model(preset, device=device)
    cfg = model.cfg
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    params = sum(p.numel() for p in model.parameters())
    bank = sum(b.numel() for b in model.glbank.buffers()) if getattr(model, "glbank", None) is not None else 0
    sync()
    rss_base = current_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    times = {"hr": args.t_hr, "s2": args.t_s2, "s1": args.t_s1}
    batch = make_inputs(cfg, batch_size, args.grid, times, device)

    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad(), amp():
                model(batch)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            with amp():
                out = model(batch)
                loss = out.fused.float().pow(2).mean()
            loss.backward()

    log(f"{preset} {mode}: batch {batch_size}, grid {args.grid}, HR {args.grid * cfg.hr_ratio}, counting FLOPs")
    counter = flop_counter()
    with counter:
        step()
    sync()
    flops = int(counter.get_total_flops())
    # per-module attribution is exact in the forward; in the backward torch's ModuleTracker over-attributes
    by_module = flops_by_module(counter, type(model).__name__) if mode == "forward" else None
    del counter
    for _ in range(args.warmup):
        step()
    sync()
    peak_rss = peak_rss_bytes()
    if cuda:
        peak_cuda = torch.cuda.max_memory_allocated(device)

    mm_step, ref = matmul_reference(flops, dtype, device)
    timed(mm_step, 1, sync)  # its warm-up
    log(f"{preset} {mode}: timing {args.iters} iterations, each followed by the matmul reference")
    secs, mm_secs = [], []
    for _ in range(args.iters):
        secs += timed(step, 1, sync)
        mm_secs += timed(mm_step, 1, sync)
    per_iter = sum(secs) / len(secs)
    achieved = flops / per_iter
    mm_per_iter = sum(mm_secs) / len(mm_secs)
    ref.update(matmul_seconds_per_iter=mm_per_iter, matmul_flops_per_s=ref["matmul_flops_per_iter"] / mm_per_iter)

    rec = {
        "bench": "model", "preset": preset, "mode": mode, "device": args.device, "dtype": args.dtype,
        "batch": batch_size, "grid": args.grid, "hr_ratio": cfg.hr_ratio, "hr_side": args.grid * cfg.hr_ratio,
        "t_hr": args.t_hr, "t_s2": args.t_s2, "t_s1": args.t_s1, "params": params, "bank_numel": bank,
        "grad_checkpointing": bool(args.grad_checkpointing and mode == "forward_backward"),
        "iters": args.iters, "warmup": 1 + args.warmup,
        "samples_per_s": batch_size / per_iter, "seconds_per_iter": per_iter, "min_seconds_per_iter": min(secs),
        "flops_per_iter": flops, "flops_per_sample": flops / batch_size,
        **({"flops_by_module": by_module} if by_module else {}),
        "achieved_flops_per_s": achieved, **ref, "ratio_to_matmul": achieved / ref["matmul_flops_per_s"],
    }
    if cuda:
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_bf16(name)
        rec.update(gpu=name, peak_flops=peak)
        if peak:
            rec["mfu"] = achieved / peak
        rec.update(peak_cuda_mib=peak_cuda / MIB, peak_cuda_delta_mib=(peak_cuda - cuda_base) / MIB)
    rec.update(peak_rss_mib=peak_rss / MIB, peak_rss_delta_mib=(peak_rss - rss_base) / MIB,
               rss_after_build_mib=rss_base / MIB, torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(rec), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------- per pixel

MIXES = {"hr+s2+s1": ("hr", "s2", "s1"), "s2+s1": ("s2", "s1")}
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (bench/model.py's gpu_peak_bf16)
PIXELS_PER_KM2 = 1e4  # 10 m pixels


def per_pixel_worker(args) -> int:
    """FLOPs of one 10 m output pixel for ``args.worker`` and every modality mix: one inference forward
    (eval, batch 1, every date valid) under FlopCounterMode on a ``--grid`` window, divided by its pixels; with
    the cost model of the README (km^2 per GPU-hour at ``--utilisation`` of an H100's dense bf16 peak)."""
    import torch

    import skysense_core
    from tests.model_inputs import make_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.worker
    torch.manual_seed(0)
    model = skysense_core.build_model(preset).eval()
    cfg = model.cfg
    times = {"hr": args.t_hr, "s2": args.t_s2, "s1": args.t_s1}
    for mix, mods in MIXES.items():
        x = make_batch(mods, batch=1, grid=args.grid, hr_ratio=cfg.hr_ratio, seed=0, times=times, lat=[45.0],
                       lon=[9.0])
        log(f"{preset} {mix}: one forward on a {args.grid} px window under FlopCounterMode")
        counter = flop_counter()
        t0 = time.perf_counter()
        with torch.inference_mode(), counter:
            model(x)
        seconds = time.perf_counter() - t0
        px = args.grid**2
        flops = counter.get_total_flops() / px
        by_module = {k: round(v / px) for k, v in flops_by_module(counter, type(model).__name__).items() if v}
        km2_h = args.utilisation * H100_BF16_PEAK / flops * 3600 / PIXELS_PER_KM2
        print(json.dumps({
            "bench": "model", "kind": "flops_per_pixel", "preset": preset, "mix": mix, "grid": args.grid,
            "hr_side": args.grid * cfg.hr_ratio if "hr" in mods else None,
            "dates": {m: times[m] for m in mods}, "hr_global_attn_block": cfg.hr_global_attn_block,
            "flops_per_px": round(flops), "gflops_per_px": round(flops / 1e9, 4), "flops_by_module": by_module,
            "gpu_model": "H100 SXM bf16 dense peak", "peak_flops": H100_BF16_PEAK,
            "utilisation": args.utilisation, "km2_per_gpu_hour": round(km2_h, 1),
            "cpu_seconds_of_this_forward": round(seconds, 2),
        }), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------- parent


def param_breakdown(preset: str = "huge") -> dict:
    """Parameters per top-level submodule of ``preset`` built on the meta device (no memory, no compute)."""
    import torch

    import skysense_core

    model = skysense_core.build_model(preset, device="meta")
    by_module: dict[str, int] = {}
    for name, mod in model.named_children():
        if name != "glbank":
            by_module[name] = sum(p.numel() for p in mod.parameters())
    for name, p in model.named_parameters(recurse=False):
        by_module[name] = p.numel()
    glbank = getattr(model, "glbank", None)
    bank_params = sum(p.numel() for p in glbank.parameters()) if glbank is not None else 0
    bank_buffers = sum(b.numel() for b in glbank.buffers()) if glbank is not None else 0
    if bank_params:
        by_module["glbank"] = bank_params
    total = sum(p.numel() for p in model.parameters())
    ordered = {k: by_module[k] for k in BREAKDOWN_MODULES if k in by_module}
    ordered.update({k: v for k, v in by_module.items() if k not in ordered})
    return {
        "bench": "model", "kind": "param_breakdown", "preset": preset, "device": "meta",
        "params_by_module": ordered, "glbank_buffer_numel": bank_buffers, "params": total,
        "params_plus_bank": total + bank_buffers, "paper_params": PAPER_PARAMS,
        "params_over_paper": total / PAPER_PARAMS, "params_plus_bank_over_paper": (total + bank_buffers) / PAPER_PARAMS,
        "torch": torch.__version__,
    }


def run_worker(args, preset: str, mode: str) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", preset, "--worker-mode", mode,
           "--device", args.device, "--dtype", args.dtype, "--grid", str(args.grid), "--t-hr", str(args.t_hr),
           "--t-s2", str(args.t_s2), "--t-s1", str(args.t_s1), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--batch", str(args.batch or default_batch(preset, args.device))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if mode == "per_pixel":
        cmd += ["--utilisation", str(args.utilisation)]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    for ln in lines:
        print(ln, flush=True)
    if proc.returncode or not lines:
        print(json.dumps({"bench": "model", "preset": preset, "mode": mode, "device": args.device,
                          "dtype": args.dtype, "error": f"worker exited with status {proc.returncode}, see stderr"}),
              flush=True)
    return proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--batch", type=int, help="samples per batch (default 2; 1 for huge on CUDA)")
    p.add_argument("--grid", type=int, default=16, help="Sentinel grid side; HR side = grid * hr_ratio")
    p.add_argument("--t-hr", type=int, default=1, help="HR dates")
    p.add_argument("--t-s2", type=int, default=20, help="S2 dates")
    p.add_argument("--t-s1", type=int, default=10, help="S1 dates")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations after the FLOP-counting one")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in training")
    p.add_argument("--param-breakdown", action="store_true", help="print the huge parameter breakdown")
    p.add_argument("--per-pixel", action="store_true",
                   help="only FLOPs per 10 m output pixel per preset and modality mix, and km^2/GPU-hour")
    p.add_argument("--utilisation", type=float, default=0.4,
                   help="--per-pixel: fraction of the GPU's dense bf16 peak assumed for km^2/GPU-hour")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-mode", choices=[*MODES, "per_pixel"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.iters < 1:
        p.error("--iters must be at least 1")
    if args.worker:
        return per_pixel_worker(args) if args.worker_mode == "per_pixel" else worker(args)

    from skysense_core.config import PRESETS

    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown:
        p.error(f"unknown presets {unknown}; known: {sorted(PRESETS)}")
    status = 0
    for preset in args.presets:
        for mode in ("per_pixel",) if args.per_pixel else MODES:
            status |= run_worker(args, preset, mode) != 0
    if args.per_pixel:
        return int(status)
    if args.param_breakdown or "huge" in args.presets or args.device == "cpu":
        print(json.dumps(param_breakdown("huge")), flush=True)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())

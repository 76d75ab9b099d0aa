"""Benchmark harness: timed medians with device synchronisation, machine facts, JSON results, tables.

Every timed interval ends with ``torch.cuda.synchronize`` on a GPU (kernels are asynchronous; reading
the clock without it measures the launch, not the work). Warm-up runs are never timed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, iters: int = 10) -> dict:
    """Median, min and max seconds of ``fn()`` over ``iters`` synchronised runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": iters}


def machine_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "git_commit": _git_commit()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------- Mish


def _naive_mish(x):
    return x * torch.tanh(F.softplus(x))


def mish_variants(device: torch.device) -> dict[str, Callable | str]:
    """name -> function, or a string saying why the variant cannot run here."""
    from .ops import fused_unavailable_reason, mish_op

    variants: dict[str, Callable | str] = {"native": F.mish, "naive": _naive_mish}
    try:
        variants["compile"] = torch.compile(F.mish)
    except Exception as exc:  # pragma: no cover - compile support varies
        variants["compile"] = f"torch.compile failed: {exc}"
    probe = torch.empty(1, device=device)
    reason = fused_unavailable_reason(probe)
    if reason is None and device.type != "cuda":
        reason = "the Triton interpreter is a correctness path, not a speed path"
    variants["fused"] = mish_op if reason is None else reason
    return variants


def bench_mish_op(*, numel: int, dtype: torch.dtype, device: torch.device, iters: int = 10,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Forward+backward time of each Mish variant, as GB/s against this device's measured copy bandwidth.

    Bytes counted are the minimum a fused fwd+bwd must move: forward reads x and writes y, backward reads
    x and dy and writes dx, so 5 tensors of ``numel`` elements.
    """
    x = torch.randn(numel, device=device, dtype=dtype).requires_grad_()
    g = torch.randn(numel, device=device, dtype=dtype)
    es = x.element_size()
    src, dst = torch.empty(numel, device=device, dtype=dtype), torch.empty(numel, device=device, dtype=dtype)
    copy = time_median(lambda: dst.copy_(src), device, iters=iters)
    copy_gbs = 2 * numel * es / copy["median_s"] / 1e9
    rows = []
    for name, fn in mish_variants(device).items():
        if isinstance(fn, str):
            rows.append({"variant": name, "skipped": fn})
            continue
        if progress:
            progress(name)

        def step(fn=fn):
            x.grad = None
            fn(x).backward(g)

        try:
            t = time_median(step, device, iters=iters)
        except Exception as exc:  # one broken variant must not stop the others
            rows.append({"variant": name, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        gbs = 5 * numel * es / t["median_s"] / 1e9
        rows.append({"variant": name, **t, "gb_per_s": gbs, "of_copy_bandwidth": gbs / copy_gbs})
    return {"numel": numel, "dtype": str(dtype).replace("torch.", ""), "copy_gb_per_s": copy_gbs, "rows": rows}


def bench_mish_models(*, models: list[str], batch: int, size: int, modes: list[str], device: torch.device,
                      precision: str, iters: int = 5, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Train-step time (forward, backward, SGD step) and peak device memory per model and Mish mode."""
    from .models import build_model
    from .ops import fused_unavailable_reason

    rows = []
    for name in models:
        for mode in modes:
            if progress:
                progress(f"{name} / {mode}")
            if mode == "fused":
                reason = fused_unavailable_reason(torch.empty(1, device=device))
                if reason is None and device.type != "cuda":
                    reason = "the Triton interpreter is a correctness path, not a speed path"
                if reason:
                    rows.append({"model": name, "mish": mode, "skipped": reason})
                    continue
            try:
                rows.append({"model": name, "mish": mode, **_train_step(name, mode, batch, size, device, precision,
                                                                        iters)})
            except Exception as exc:
                rows.append({"model": name, "mish": mode, "skipped": f"{type(exc).__name__}: {exc}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _train_step(name, mode, batch, size, device, precision, iters) -> dict:
    from .models import build_model

    torch.manual_seed(0)
    model, _ = build_model(name, 1000, mish=mode)
    model.to(device).train()
    if mode == "compile":
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time_median(step, device, warmup=2, iters=iters)
    out = {**t, "img_per_s": batch / t["median_s"], "batch": batch, "size": size, "precision": precision}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def mish_markdown(results: dict) -> str:
    """The README tables, generated from a results file."""
    m = results["machine"]
    where = m.get("gpu") or f"CPU ({m['host_cpus']} cores)"
    lines = [f"Measured {m['date'][:10]} on {where}, torch {m['torch']}, "
             f"commit {m.get('git_commit')} (`{results['command']}`).", ""]
    for op in results["op"]:
        lines += [f"Mish fwd+bwd, {op['numel']:,} {op['dtype']} elements; copy bandwidth "
                  f"{op['copy_gb_per_s']:.1f} GB/s", "",
                  "| variant | median ms | GB/s | of copy bandwidth |", "|---|---:|---:|---:|"]
        for r in op["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['variant']} | – | – | skipped: {r['skipped']} |")
            else:
                lines.append(f"| {r['variant']} | {r['median_s'] * 1e3:.2f} | {r['gb_per_s']:.1f} | "
                             f"{r['of_copy_bandwidth']:.0%} |")
        lines.append("")
    if results.get("models"):
        lines += ["| model | Mish | batch × px | precision | step ms (median) | img/s | peak GiB |",
                  "|---|---|---|---|---:|---:|---:|"]
        for r in results["models"]:
            if "skipped" in r:
                lines.append(f"| {r['model']} | {r['mish']} | | | skipped: {r['skipped']} | | |")
            else:
                peak = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "–"
                lines.append(f"| {r['model']} | {r['mish']} | {r['batch']} × {r['size']} | {r['precision']} | "
                             f"{r['median_s'] * 1e3:.0f} | {r['img_per_s']:.1f} | {peak} |")
    return "\n".join(lines).rstrip() + "\n"


def update_readme_section(readme: str | Path, marker: str, body: str) -> None:
    """Replace the text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in the README."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = readme.with_name(f".{readme.name}.tmp{os.getpid()}")
    tmp.write_text(f"{head}{start}\n{body}{end}{tail}")
    os.replace(tmp, readme)


# README sections: marker -> (results file, renderer). ``regenerate_readme`` fills every section.
README_SECTIONS = {
    "bench-mish-gpu": ("benchmarks/results/mish-gpu.json", mish_markdown),
    "bench-mish-gpu-compile": ("benchmarks/results/mish-gpu-compile.json", mish_markdown),
    "bench-mish-cpu": ("benchmarks/results/mish-cpu.json", mish_markdown),
}


def _loader_md(results: dict) -> str:
    from .bench_loader import loader_markdown

    return loader_markdown(results)


for _name in ("elpv-384-jpeg", "elpv-384-png", "mixed-jpeg", "fmnist-384-jpeg"):
    for _where in ("cpu", "gpu"):
        README_SECTIONS[f"bench-loader-{_name}-{_where}"] = (f"benchmarks/results/loader-{_name}-{_where}.json",
                                                             _loader_md)


def regenerate_readme(readme: str | Path = "README.md", root: str | Path = ".") -> list[str]:
    """Rewrite each README benchmark section from its results file; returns the sections written."""
    done = []
    text = Path(readme).read_text()
    for marker, (results, render) in README_SECTIONS.items():
        if f"<!-- {marker}:start -->" not in text:
            continue
        path = Path(root) / results
        body = render(json.loads(path.read_text())) if path.is_file() else f"Not measured yet (no `{results}`).\n"
        update_readme_section(readme, marker, body)
        done.append(marker)
    return done


# ----------------------------------------------------------------------------------------------- train step


def bench_step(data: str, *, model: str, batch: int, size: int, device: torch.device, loader: str = "auto",
               precisions: list[str], channels_last: list[bool], steps: int = 10, warmup: int = 2,
               workers: int = 0, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Train-step throughput fed by fastsort's loader (with CutMix/GridMask) vs synthetic data on the device.

    ``loader_bound`` = 1 - synthetic / real step time: the share of a real step spent waiting for input.
    """
    from .augment import mix_batch, soft_cross_entropy
    from .index import load_dataset
    from .loader import make_loader
    from .models import build_model

    index = load_dataset(data).index
    if len(index) < batch * (steps + warmup):
        raise ValueError(f"{data} has {len(index)} images; bench step needs batch x (steps + warm-up) = "
                         f"{batch * (steps + warmup)}; lower --steps or --batch")
    rows = []
    for precision in precisions:
        for cl in channels_last:
            if progress:
                progress(f"{model} {precision} {'channels-last' if cl else 'NCHW'}")
            torch.manual_seed(0)
            net, info = build_model(model, index.num_classes, channels_last=cl)
            net.to(device).train()
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
            amp = precision in ("bf16", "fp16")
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            fmt = torch.channels_last if cl else torch.contiguous_format

            def step(x, y):
                x, target = mix_batch(x.contiguous(memory_format=fmt), y, index.num_classes)
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss = soft_cross_entropy(net(x), target)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

            xs = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
            ys = torch.randint(0, index.num_classes, (batch,), device=device)
            synthetic = time_median(lambda: step(xs.clone(), ys), device, warmup=warmup, iters=steps)
            ld = make_loader(index, batch_size=batch, image_size=size, train=True, backend=loader, device=str(device),
                             mean=info.mean, std=info.std, precision=precision if device.type == "cuda" else "fp32",
                             workers=workers)
            it = ld.epoch(0)
            for _ in range(warmup):
                step(*next(it))
            sync(device)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step(*next(it))
                sync(device)
                times.append(time.perf_counter() - t0)
            it.close()
            real = statistics.median(times)
            row = {"model": model, "precision": precision, "channels_last": cl, "batch": batch, "size": size,
                   "loader": ld.backend, "synthetic_img_per_s": batch / synthetic["median_s"],
                   "real_img_per_s": batch / real, "loader_bound": max(0.0, 1 - synthetic["median_s"] / real)}
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(row)
            del net, opt, ld, it
    return rows


def step_markdown(results: dict) -> str:
    m = results["machine"]
    where = m.get("gpu") or f"CPU ({m['host_cpus']} cores)"
    lines = [f"`{results['command']}` on {where}, {m['date'][:10]}, commit {m.get('git_commit')}.", "",
             "| model | precision | layout | batch × px | loader | synthetic img/s | real img/s | loader-bound |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['precision']} | {'channels-last' if r['channels_last'] else 'NCHW'} | "
                     f"{r['batch']} × {r['size']} | {r['loader']} | {r['synthetic_img_per_s']:.1f} | "
                     f"{r['real_img_per_s']:.1f} | {r['loader_bound']:.0%} |")
    return "\n".join(lines) + "\n"


def scorecard_markdown(card: dict) -> str:
    m = card["machine"]
    where = m.get("gpu") or f"CPU ({m['host_cpus']} cores)"
    lines = [f"Recipe `{card['recipe']}` on {where}, {m['date'][:10]}, commit {m.get('git_commit')}, "
             f"{card['seconds'] / 60:.1f} min end to end.", "",
             "| stage | models | held-out accuracy | macro-F1 |", "|---|---|---:|---:|"]
    lines += [f"| {r['stage']} | {r['models']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |" for r in card["rows"]]
    return "\n".join(lines) + "\n"


README_SECTIONS["scorecard-elpv-cpu"] = ("benchmarks/results/scorecard-elpv-cpu.json", scorecard_markdown)
README_SECTIONS["bench-step-cpu"] = ("benchmarks/results/step-cpu.json", step_markdown)
README_SECTIONS["bench-step-gpu"] = ("benchmarks/results/step-gpu.json", step_markdown)

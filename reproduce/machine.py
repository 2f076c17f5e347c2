"""What machine a run ran on: the CPU's model name, its core count and the GPU, for records and benchmarks."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

__all__ = ["cpu_model", "default_device", "lscpu_model", "machine_info"]


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it, with its family and model numbers where ``lscpu`` gives them
    (a cloud CPU's name alone, such as "AMD EPYC", can stand for two generations); ``/proc/cpuinfo`` or
    ``platform`` as fallbacks."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = lscpu_model(out)
        if name:
            return name
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``: the device every command uses when ``--device`` is not given."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def lscpu_model(text: str) -> Optional[str]:
    """``"NAME (family F model M)"`` from ``lscpu``'s output (the parenthesis only when both are there)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get("Model name")
    if not name:
        return None
    family, model = fields.get("CPU family"), fields.get("Model")
    return f"{name} (family {family} model {model})" if family and model else name


def machine_info(device: Optional[str] = None) -> dict:
    """``{"cpu": model name, "cores": logical cores, "gpu": name or None}`` (the GPU only for a CUDA device)."""
    gpu = None
    if device is not None and str(device).startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu}

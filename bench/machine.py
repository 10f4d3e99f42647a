"""The machine a benchmark ran on: CPU, cores, load, memory, library versions and GPU, for every result file."""

from __future__ import annotations

import os
import platform
import time

from braintumnet.report.provenance import cpu_model, usable_cores


def _memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe() -> dict:
    """A flat description; ``load_average`` is read now, so call it again when a benchmark ends."""
    import flwr
    import monai
    import torch

    usable = usable_cores()
    cuda = torch.cuda.is_available()
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": flwr.__version__,
        "monai": monai.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
    }


def one_line(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']} (CUDA {machine['cuda']})" if machine.get("gpu") else ", no GPU"
    load = ", ".join(str(x) for x in machine["load_average"])
    return (f"{machine['cpu']}, {machine['cpus_usable']} usable core(s) of {machine['cpu_count']}, "
            f"{machine['memory_gib']} GiB, load average {load} at {machine['when']}{gpu}; torch {machine['torch']} "
            f"({machine['torch_threads']} thread(s)), flwr {machine['flwr']}, monai {machine['monai']}, "
            f"Python {machine['python']}")

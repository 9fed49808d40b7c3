"""The environment a run ran in, as MLflow tags: package versions, the lock, the CPU or GPU and its numerics.

Two machines of the same kind can give different numbers from the same code (other wheels, another vector
unit, another thread count); these tags let the MLflow compare view show which of them differed. Reading one
never fails a run: what cannot be read is tagged `unknown (<why>)` and said in one line.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

from ldmflow.tags import ENV_TAG_PREFIX

logger = logging.getLogger(__name__)

PACKAGES = ("torch", "diffusers", "accelerate", "mlflow", "numpy", "pillow")
CPU_INFO = Path("/proc/cpuinfo")
_UNKNOWN = "unknown"


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model(cpu_info: Path = CPU_INFO) -> str:
    """`AMD EPYC 9454 48-Core Processor`: the first `model name` of /proc/cpuinfo, else the platform's word."""
    try:
        for line in cpu_info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError as error:
        reason = f"{cpu_info}: {error.strerror or error}"
    else:
        reason = f"{cpu_info} names no model"
    return platform.processor() or f"{_UNKNOWN} ({reason})"


def lock_tags() -> dict[str, str]:
    """The lock's digest and whether this environment is exactly it (`no: numpy 2.3.1, locked 2.4.6; ...`)."""
    from ldmflow import lock as lock_file
    from ldmflow.errors import LdmflowError

    if not lock_file.LOCK_FILE.is_file():
        return {"lock": "none (ldmflow was not installed from a checkout with requirements.lock)"}
    try:
        lock = lock_file.read_lock()
    except LdmflowError as error:
        return {"lock": f"{_UNKNOWN} ({str(error)[:200]})"}
    problems = lock_file.installed_mismatches(lock)
    match = "yes" if not problems else "no: " + "; ".join(problems[:5]) + (
        f"; +{len(problems) - 5} more" if len(problems) > 5 else "")
    return {"lock": lock.short_digest, "lock_match": match[:500]}


def device_tags() -> dict[str, str]:
    """torch's CPU numerics (capability, threads, oneDNN's ISA cap when set) and each CUDA device in use."""
    import torch

    tags = {"cpu": cpu_model(), "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "threads": str(torch.get_num_threads())}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        tags["onednn_max_cpu_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        tags.update(cuda_device=torch.cuda.get_device_name(index), cuda_capability=f"{major}.{minor}",
                    cuda_runtime=str(torch.version.cuda), cuda_driver=cuda_driver())
    return tags


def cuda_driver() -> str:
    """The NVIDIA driver's version: from the kernel module's file, else NVML (the gpu extra)."""
    version_file = Path("/proc/driver/nvidia/version")
    try:
        for word in version_file.read_text().split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as error:  # noqa: BLE001  no NVML, no driver file: still a tag, never a failed run
        return f"{_UNKNOWN} ({type(error).__name__})"


@functools.lru_cache(maxsize=1)
def environment_tags() -> dict[str, str]:
    """`ldmflow.env.*` tags for this process (read once). A part that cannot be read is tagged `unknown (...)`
    with one warning line; it never raises."""
    tags = {"python": platform.python_version(), **package_versions()}
    for name, part in (("lock", lock_tags), ("device", device_tags)):
        try:
            tags.update(part())
        except Exception as error:  # noqa: BLE001  a tag is never worth a failed run
            tags[name] = f"{_UNKNOWN} ({type(error).__name__}: {error})"[:500]
    for name, value in tags.items():
        if value.startswith(_UNKNOWN):
            logger.warning("Environment tag %s%s is %s.", ENV_TAG_PREFIX, name, value)
    return {ENV_TAG_PREFIX + name: value for name, value in tags.items()}

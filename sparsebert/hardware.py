"""What the machine is: its CPU model and features, usable cores, and whether bf16 pays.

Machines differ from one run to the next (some CPUs have AMX/AVX512-BF16, some only AVX2), so
training precision and thread counts are detected, never assumed, and every reported figure
carries the machine it was measured on.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}
# CPU features with which DeepSparse runs INT8 natively (its docs: emulated on AVX2).
NATIVE_INT8_FLAGS = {"avx512_vnni", "amx_int8"}
_SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpuinfo(key: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def physical_cores() -> int:
    """Physical cores this process may use (one thread each: SMT siblings share the vector
    units, so a second thread per core only adds contention), capped by a cgroup CPU quota."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in usable:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    count = len(cores)
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def native_bf16() -> bool:
    """True where bf16 matrix products run natively: a CUDA GPU that supports them, or a CPU
    with AMX-BF16 or AVX512-BF16. Elsewhere (AVX2-only CPUs) bf16 autocast is emulated and
    slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(_BF16_FLAGS & cpu_flags())


def native_int8(flags: set[str] | None = None) -> bool:
    """True where DeepSparse's INT8 kernels run natively (AVX512-VNNI or AMX); on AVX2 alone it
    emulates them, and an INT8 model runs slower than the FP32 one."""
    return bool(NATIVE_INT8_FLAGS & (cpu_flags() if flags is None else set(flags)))


def int8_note(flags: set[str] | None = None) -> str | None:
    """One line for a user about to run INT8 on DeepSparse where it is emulated (an x86 CPU
    without AVX512-VNNI or AMX), else None."""
    if native_int8(flags) or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return (f"{cpu_model()} has no AVX512-VNNI or AMX: DeepSparse emulates INT8 on it (its docs), so the INT8 "
            "student is not expected to beat the FP32 one here; the bench measures both (serve --checkpoint student)")


def serve_int8(has_int8: bool, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether to serve a run's INT8 student rather than its FP32 one on this CPU, and why: only
    where INT8 runs natively (AVX512-VNNI or AMX), the CPUs on which the project measured it faster;
    elsewhere DeepSparse emulates it and nothing measured says ONNX Runtime's is faster."""
    if not has_int8:
        return False, "the run has no exported INT8 student (train it with --int8, then export)"
    if not native_int8(flags):
        return False, (f"{cpu_model()} has no AVX512-VNNI or AMX, where the INT8 student was measured faster "
                       f"(DeepSparse emulates INT8 without them); --checkpoint student-int8 serves it anyway")
    return True, f"INT8 runs natively on {cpu_model()} and the INT8 student is the faster one there"


def deepsparse_isa(flags: set[str] | None = None) -> str:
    """The instruction set DeepSparse runs on here (its own detection, which NM_ARCH overrides) and
    whether its INT8 kernels are native: printed beside every speed figure."""
    from deepsparse.cpu import cpu_architecture

    isa = cpu_architecture().isa
    return f"{isa}, INT8 {'native' if native_int8(flags) else 'emulated'}"


def describe_for_speed() -> dict:
    """``describe`` and the ISA DeepSparse runs on: for every report of a speed figure."""
    return {**describe(), "deepsparse_isa": deepsparse_isa()}


def resolve_precision(choice: str) -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16, else ``fp32``."""
    if choice == "auto":
        return "bf16" if native_bf16() else "fp32"
    return choice


def describe() -> dict:
    """The machine, for every report that holds a measured figure."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_features": [f for f in _SHOWN_FLAGS if f in cpu_flags()],
        "cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        # physical_cores counts the cores this process may use; fewer threads (OMP_NUM_THREADS) run slower.
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }

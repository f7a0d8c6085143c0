"""NVIDIA GPU state through NVML (``nvidia-ml-py``, the optional ``gpu`` extra): what identifies the GPU and its
driver (for the device fingerprint) and what changes under load (SM clock, temperature), read before and after a
measurement so a run whose clocks moved is flagged rather than trusted.

Everything here degrades to None / empty without the package or a driver; the NVML module is injectable, so the
logic is tested with a fake on machines with no GPU.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

CLOCK_CHANGE_TOLERANCE = 0.05  # flag a measurement whose SM clock moved by more than 5%


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def load_nvml() -> Optional[Any]:
    """The initialised ``pynvml`` module, or None where nvidia-ml-py or the driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    return pynvml


class GpuMonitor:
    """One GPU seen through NVML."""

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle

    @classmethod
    def open(cls, index: int = 0, uuid: Optional[str] = None, nvml: Any = None) -> Optional["GpuMonitor"]:
        """The GPU with this UUID (what torch reports; survives CUDA_VISIBLE_DEVICES renumbering), else NVML's
        ``index``; None when NVML is unavailable."""
        nvml = nvml if nvml is not None else load_nvml()
        if nvml is None:
            return None
        handle = None
        if uuid:
            u = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(u)
            except Exception:
                handle = None
        if handle is None:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                return None
        return cls(nvml, handle)

    def _try(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, fn)(*args)
        except Exception:  # a query this GPU or driver does not support
            return None

    def static_info(self) -> Dict[str, Any]:
        """What stays the same from run to run: fit for the fingerprint (and its cache keys)."""
        n = self.nvml
        power = self._try("nvmlDeviceGetPowerManagementLimit", self.handle)
        name = self._try("nvmlDeviceGetName", self.handle)
        driver = self._try("nvmlSystemGetDriverVersion")
        return {
            "gpu_name": _text(name) if name is not None else None,
            "driver": _text(driver) if driver is not None else None,
            "max_sm_clock_mhz": self._try("nvmlDeviceGetMaxClockInfo", self.handle, n.NVML_CLOCK_SM),
            "power_limit_w": None if power is None else round(power / 1000.0, 1),
        }

    def reading(self) -> Dict[str, Any]:
        """What changes under load: the SM clock now (MHz) and the GPU temperature (C)."""
        n = self.nvml
        return {
            "sm_clock_mhz": self._try("nvmlDeviceGetClockInfo", self.handle, n.NVML_CLOCK_SM),
            "temperature_c": self._try("nvmlDeviceGetTemperature", self.handle, n.NVML_TEMPERATURE_GPU),
        }


def conditions(before: Dict[str, Any], after: Dict[str, Any],
               tolerance: float = CLOCK_CHANGE_TOLERANCE) -> Dict[str, Any]:
    """The GPU's state around one measurement, with ``clock_changed`` True when the SM clock moved by more than
    ``tolerance`` (relative to the clock before): the samples then mix two speeds."""
    b, a = before.get("sm_clock_mhz"), after.get("sm_clock_mhz")
    change = (a - b) / b if (a is not None and b) else None
    return {
        "sm_clock_mhz_before": b,
        "sm_clock_mhz_after": a,
        "temperature_c_before": before.get("temperature_c"),
        "temperature_c_after": after.get("temperature_c"),
        "sm_clock_change": change,
        "clock_changed": bool(change is not None and abs(change) > tolerance),
    }


def clock_warning(what: str, cond: Dict[str, Any]) -> Optional[str]:
    """One line for a measurement whose clocks moved, None otherwise."""
    if not cond.get("clock_changed"):
        return None
    return (f"SM clock changed {cond['sm_clock_mhz_before']} -> {cond['sm_clock_mhz_after']} MHz "
            f"({100 * cond['sm_clock_change']:+.0f}%) while timing {what}; the figure mixes two speeds: lock the "
            f"clocks (nvidia-smi -lgc) or raise the profile's warm-up")

"""Device state: one interface over CPU load and frequency, cgroup quota, thermal zones, battery and memory.

A :class:`Telemetry` object merges what its providers report into a :class:`DeviceState`. Every real
provider takes a ``root`` directory (so tests point it at a fake sysfs/procfs tree) and degrades
gracefully: a missing or garbled source gives ``None`` fields and a debug log line, never an exception.
:class:`ReplayProvider` plays back a recorded (:func:`record`) or scripted trace instead.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("bitdial.control")

Clock = Callable[[], float]


# ---------------------------------------------------------------------------------------------------------------------
# the state


@dataclass
class DeviceState:
    """A snapshot of the device. ``None`` means unknown (the source is absent or unreadable)."""

    timestamp: float = 0.0  # seconds, the Telemetry clock (time.time() by default)
    cpu_util: float | None = None  # 0..1, whole machine, since the previous read
    per_cpu_util: list[float] = field(default_factory=list)  # 0..1 per logical CPU
    cpu_count: int | None = None  # logical CPUs this process may run on
    cpu_affinity: list[int] | None = None  # their indices (None: all)
    self_cpu_cores: float | None = None  # cores busy with this process (all its threads) since the previous read
    cpu_freq_mhz: float | None = None  # current, mean over CPUs
    cpu_freq_max_mhz: float | None = None
    cpu_quota_cores: float | None = None  # cgroup CPU quota in cores; None if unlimited or absent
    temperature_c: float | None = None  # max over thermal zones
    thermal_zones: dict[str, float] = field(default_factory=dict)  # zone type -> °C
    battery_percent: float | None = None
    battery_status: str | None = None  # "Charging", "Discharging", "Full", "Not charging", "Unknown"
    battery_power_w: float | None = None  # power drawn from (or into) the battery
    on_ac: bool | None = None
    mem_available_bytes: int | None = None
    mem_total_bytes: int | None = None
    slowdown_hint: float | None = None  # expected slowdown vs an idle machine, given (traces); overrides the estimate
    extra: dict[str, Any] = field(default_factory=dict)  # fields a trace or custom provider adds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceState:
        """Build a state from a dict; keys that are not fields go to ``extra``."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k != "extra"}
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in known})
        return cls(**kw, extra=extra)

    @property
    def discharging(self) -> bool:
        """True when the device is known to run on its battery."""
        return self.battery_status == "Discharging" or self.on_ac is False

    @property
    def other_cpu_cores(self) -> float | None:
        """Cores busy with other processes on the CPUs this process may use (None if unknown)."""
        if self.per_cpu_util:
            idx = self.cpu_affinity if self.cpu_affinity else range(len(self.per_cpu_util))
            busy = sum(self.per_cpu_util[i] for i in idx if 0 <= i < len(self.per_cpu_util))
        elif self.cpu_util is not None and self.cpu_count:
            busy = self.cpu_util * self.cpu_count
        else:
            return None
        return max(0.0, busy - (self.self_cpu_cores or 0.0))

    def expected_slowdown(self, threads: int | None = None, max_slowdown: float = 8.0) -> float:
        """Expected decode slowdown vs an idle, unlimited machine, from the CPU state alone.

        ``slowdown_hint`` wins when set. Otherwise the model's ``threads`` (default: every usable core)
        share ``min(cpu_count, cpu_quota_cores) - other_cpu_cores`` cores: with 2 threads on 2 cores and
        another process busy on one, the estimate is 2. Frequency is not used: an idle governor reports a
        low clock that rises under load, and throttling shows up in the observed latency anyway.
        """
        if self.slowdown_hint is not None:
            return min(max(float(self.slowdown_hint), 1.0 / max_slowdown), max_slowdown)
        n = len(self.cpu_affinity) if self.cpu_affinity else (self.cpu_count or len(self.per_cpu_util) or None)
        if not n:
            return 1.0
        cores = float(n) if self.cpu_quota_cores is None else min(float(n), self.cpu_quota_cores)
        t = float(threads) if threads else cores
        avail = cores - (self.other_cpu_cores or 0.0)
        avail = max(avail, t / max_slowdown, 1e-9)
        return min(max(1.0, t / avail), max_slowdown)


_FIELDS = {f.name for f in dataclasses.fields(DeviceState)}
_NUMERIC = {"timestamp", "cpu_util", "cpu_freq_mhz", "cpu_freq_max_mhz", "cpu_quota_cores", "temperature_c",
            "battery_percent", "battery_power_w", "mem_available_bytes", "mem_total_bytes", "slowdown_hint",
            "self_cpu_cores", "cpu_count"}


# ---------------------------------------------------------------------------------------------------------------------
# small readers that never raise


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except (OSError, ValueError) as e:
        log.debug("telemetry: cannot read %s: %s", path, e)
        return None


def _read_float(path: Path) -> float | None:
    s = _read_text(path)
    if s is None:
        return None
    try:
        v = float(s.split()[0])
    except (ValueError, IndexError):
        log.debug("telemetry: not a number in %s: %r", path, s[:40])
        return None
    return v if math.isfinite(v) else None


def _import_psutil():
    try:
        import psutil  # optional: not a runtime dependency of bitdial

        return psutil
    except ImportError:
        log.debug("telemetry: psutil is not installed; reading /proc and /sys directly")
        return None


class Provider(Protocol):
    """A source of device state: ``read()`` returns a partial dict of :class:`DeviceState` fields."""

    name: str

    def read(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------------------------------
# CPU utilization and frequency


class PsutilCPU:
    """CPU utilization (whole machine, per CPU, this process) and frequency.

    Uses psutil when it is importable and ``root`` is the real ``/``; otherwise parses
    ``root/proc/stat``, ``root/proc/self/stat``, ``root/sys/devices/system/cpu/cpu*/cpufreq`` and
    ``root/proc/cpuinfo``. Utilization is measured between consecutive reads (the first read covers the
    time since construction; ``None`` when no time has passed).
    """

    name = "cpu"

    def __init__(self, root: str | Path = "/", use_psutil: bool | None = None) -> None:
        self.root = Path(root)
        real = self.root.resolve() == Path("/")
        self._ps = _import_psutil() if (use_psutil if use_psutil is not None else real) else None
        self._real = real
        self._prev_cpu = self._cpu_times()  # (busy, total) seconds or ticks per CPU
        self._prev_self = self._self_times()  # (cpu seconds of this process, wall seconds)

    # -- raw counters
    def _cpu_times(self) -> list[tuple[float, float]] | None:
        if self._ps is not None:
            try:
                out = []
                for t in self._ps.cpu_times(percpu=True):
                    d = t._asdict()
                    total = sum(d.values()) - d.get("guest", 0.0) - d.get("guest_nice", 0.0)
                    out.append((total - d.get("idle", 0.0) - d.get("iowait", 0.0), total))
                return out or None
            except Exception as e:  # psutil raises its own errors on odd platforms
                log.debug("telemetry: psutil.cpu_times failed: %s", e)
                return None
        text = _read_text(self.root / "proc" / "stat")
        if text is None:
            return None
        out = []
        for line in text.splitlines():
            parts = line.split()
            if not parts or not parts[0].startswith("cpu") or parts[0] == "cpu":
                continue
            try:
                v = [float(x) for x in parts[1:11]]
            except ValueError:
                log.debug("telemetry: garbled line in proc/stat: %r", line[:60])
                return None
            if len(v) < 4:
                return None
            v += [0.0] * (10 - len(v))
            total = sum(v[:8])  # user..steal; guest times are already counted in user
            out.append((total - v[3] - v[4], total))
        return out or None

    def _self_times(self) -> tuple[float, float] | None:
        wall = time.monotonic()
        if self._ps is not None:
            try:
                t = self._ps.Process().cpu_times()
                return t.user + t.system, wall
            except Exception as e:
                log.debug("telemetry: psutil.Process().cpu_times failed: %s", e)
                return None
        text = _read_text(self.root / "proc" / "self" / "stat")
        if not text or ")" not in text:
            return None
        rest = text.rsplit(")", 1)[1].split()
        try:
            ticks = float(rest[11]) + float(rest[12])  # utime, stime (fields 14 and 15)
        except (ValueError, IndexError):
            log.debug("telemetry: garbled proc/self/stat")
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        return ticks / hz, wall

    def _freq(self) -> tuple[float | None, float | None]:
        if self._ps is not None:
            try:
                f = self._ps.cpu_freq()
                if f is not None:
                    return (f.current or None), (f.max or None)
            except Exception as e:
                log.debug("telemetry: psutil.cpu_freq failed: %s", e)
            return None, None
        base = self.root / "sys" / "devices" / "system" / "cpu"
        cur, mx = [], []
        with contextlib.suppress(OSError):
            for d in sorted(base.glob("cpu[0-9]*/cpufreq")):
                c, m = _read_float(d / "scaling_cur_freq"), _read_float(d / "cpuinfo_max_freq")
                if c is not None and c > 0:
                    cur.append(c / 1000.0)  # kHz -> MHz
                if m is not None and m > 0:
                    mx.append(m / 1000.0)
        if not cur:
            text = _read_text(self.root / "proc" / "cpuinfo") or ""
            for line in text.splitlines():
                if line.lower().startswith("cpu mhz") and ":" in line:
                    with contextlib.suppress(ValueError):
                        cur.append(float(line.split(":", 1)[1]))
        return (sum(cur) / len(cur) if cur else None), (max(mx) if mx else None)

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        now = self._cpu_times()
        prev, self._prev_cpu = self._prev_cpu, now
        if now is not None:
            out["cpu_count"] = len(now)
            if prev is not None and len(prev) == len(now):
                per = []
                for (b0, t0), (b1, t1) in zip(prev, now):
                    dt = t1 - t0
                    per.append(round(min(1.0, max(0.0, (b1 - b0) / dt)), 4) if dt > 0 else None)
                if per and all(p is not None for p in per):
                    out["per_cpu_util"] = per
                    out["cpu_util"] = sum(per) / len(per)
        if self._real and hasattr(os, "sched_getaffinity"):
            with contextlib.suppress(OSError):
                aff = sorted(os.sched_getaffinity(0))
                out["cpu_affinity"], out["cpu_count"] = aff, len(aff)
        s_now = self._self_times()
        s_prev, self._prev_self = self._prev_self, s_now
        if s_now is not None and s_prev is not None and s_now[1] > s_prev[1]:
            out["self_cpu_cores"] = max(0.0, (s_now[0] - s_prev[0]) / (s_now[1] - s_prev[1]))
        out["cpu_freq_mhz"], out["cpu_freq_max_mhz"] = self._freq()
        return out


# ---------------------------------------------------------------------------------------------------------------------
# cgroup CPU quota


class CgroupCPU:
    """The cgroup CPU quota in cores: v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``.

    Looks at this process's cgroup (from ``proc_root/self/cgroup``) and its ancestors under ``root`` and
    reports the tightest quota; ``None`` if every level is unlimited or nothing is readable.
    """

    name = "cgroup"

    def __init__(self, root: str | Path = "/sys/fs/cgroup", proc_root: str | Path = "/proc") -> None:
        self.root = Path(root)
        self.proc_root = Path(proc_root)

    def _own_paths(self) -> tuple[str | None, str | None]:
        """(v2 path, v1 cpu path) of this process from /proc/self/cgroup."""
        v2 = v1 = None
        for line in (_read_text(self.proc_root / "self" / "cgroup") or "").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                v2 = parts[2]
            elif "cpu" in parts[1].split(","):
                v1 = parts[2]
        return v2, v1

    def _chain(self, base: Path, rel: str | None) -> list[Path]:
        """``base/rel`` and its ancestors up to ``base``, deepest first."""
        dirs = [base]
        if rel:
            cur = base
            for part in [p for p in rel.split("/") if p and p not in (".", "..")]:
                cur = cur / part
                dirs.append(cur)
        return [d for d in reversed(dirs) if d.is_dir()]

    def read(self) -> dict[str, Any]:
        v2_path, v1_path = self._own_paths()
        quotas: list[float] = []
        if (self.root / "cgroup.controllers").exists():  # unified hierarchy
            for d in self._chain(self.root, v2_path):
                s = _read_text(d / "cpu.max")
                if not s:
                    continue
                parts = s.split()
                if parts[0] == "max":
                    continue
                try:
                    q, p = float(parts[0]), float(parts[1]) if len(parts) > 1 else 100000.0
                except ValueError:
                    log.debug("telemetry: garbled %s: %r", d / "cpu.max", s)
                    continue
                if q > 0 and p > 0:
                    quotas.append(q / p)
        else:
            for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu", "."):
                base = self.root / name
                if not (base / "cpu.cfs_quota_us").exists():
                    continue
                for d in self._chain(base, v1_path):
                    q, p = _read_float(d / "cpu.cfs_quota_us"), _read_float(d / "cpu.cfs_period_us")
                    if q is not None and p and q > 0 and p > 0:
                        quotas.append(q / p)
                break
        return {"cpu_quota_cores": min(quotas) if quotas else None}


# ---------------------------------------------------------------------------------------------------------------------
# thermal zones


class Thermal:
    """Temperatures of ``root/thermal_zone*`` (``temp`` in millidegrees, ``type``); the max is
    ``temperature_c``. Readings outside -40..150 °C are treated as garbage. ``types`` restricts the
    zones that count towards the max (all zones are still reported)."""

    name = "thermal"

    def __init__(self, root: str | Path = "/sys/class/thermal", types: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        self.types = set(types) if types is not None else None

    def read(self) -> dict[str, Any]:
        zones: dict[str, float] = {}
        counted: list[float] = []
        try:
            dirs = sorted(self.root.glob("thermal_zone*"), key=lambda p: (len(p.name), p.name))
        except OSError:
            dirs = []
        for d in dirs:
            milli = _read_float(d / "temp")
            if milli is None:
                continue
            c = milli / 1000.0
            if not -40.0 <= c <= 150.0:
                log.debug("telemetry: implausible temperature %.1f °C in %s", c, d)
                continue
            kind = _read_text(d / "type") or d.name
            key = kind if kind not in zones else f"{kind}:{d.name}"
            zones[key] = c
            if self.types is None or kind in self.types:
                counted.append(c)
        return {"temperature_c": max(counted) if counted else None, "thermal_zones": zones}


# ---------------------------------------------------------------------------------------------------------------------
# battery and mains


class Battery:
    """Battery capacity, status and power, and whether mains power is online, from ``root/*``.

    Batteries (``type`` Battery, ``scope`` not Device, so a mouse's battery is ignored): ``capacity`` or
    ``energy_now/energy_full`` or ``charge_now/charge_full``; ``status``; ``power_now`` (µW) or
    ``current_now`` (µA) × ``voltage_now`` (µV). Several batteries: the percents are averaged (weighted by
    full energy when known), the powers summed. Mains/USB supplies give ``on_ac`` (any online); without
    one, ``on_ac`` is inferred from the battery status.
    """

    name = "battery"

    def __init__(self, root: str | Path = "/sys/class/power_supply") -> None:
        self.root = Path(root)

    def read(self) -> dict[str, Any]:
        pcts: list[tuple[float, float]] = []  # (percent, weight)
        statuses: list[str] = []
        powers: list[float] = []
        online: list[bool] = []
        try:
            supplies = sorted(p for p in self.root.iterdir())
        except OSError:
            supplies = []
        for d in supplies:
            kind = (_read_text(d / "type") or "").lower()
            if kind == "battery":
                if (_read_text(d / "scope") or "").lower() == "device":
                    continue
                if (_read_text(d / "present") or "1") == "0":
                    continue
                full = _read_float(d / "energy_full") or _read_float(d / "charge_full")
                pct = _read_float(d / "capacity")
                if pct is None:
                    now = _read_float(d / "energy_now")
                    now = now if now is not None else _read_float(d / "charge_now")
                    if now is not None and full:
                        pct = 100.0 * now / full
                if pct is not None and 0.0 <= pct <= 100.0:
                    pcts.append((pct, full or 1.0))
                elif pct is not None:
                    log.debug("telemetry: battery capacity out of range in %s: %s", d, pct)
                status = _read_text(d / "status")
                if status:
                    statuses.append(status)
                p = _read_float(d / "power_now")
                if p is None:
                    i, v = _read_float(d / "current_now"), _read_float(d / "voltage_now")
                    if i is not None and v is not None:
                        p = i * v / 1e6  # µA·µV = pW -> µW
                if p is not None:
                    powers.append(abs(p) / 1e6)  # µW -> W (some drivers report a signed value)
            elif kind in ("mains", "usb", "usb_c", "usb_pd", "usb_pd_drp", "wireless"):
                o = _read_float(d / "online")
                if o is not None:
                    online.append(o > 0)
        out: dict[str, Any] = {"battery_percent": None, "battery_status": None, "battery_power_w": None,
                               "on_ac": None}
        if pcts:
            w = sum(x[1] for x in pcts)
            out["battery_percent"] = sum(p * x for p, x in pcts) / w
        if statuses:
            # one discharging battery means the device runs on battery
            out["battery_status"] = "Discharging" if "Discharging" in statuses else statuses[0]
        if powers:
            out["battery_power_w"] = sum(powers)
        if online:
            out["on_ac"] = any(online)
        elif out["battery_status"] in ("Charging", "Full", "Not charging"):
            out["on_ac"] = True
        elif out["battery_status"] == "Discharging":
            out["on_ac"] = False
        return out


# ---------------------------------------------------------------------------------------------------------------------
# memory


class Memory:
    """Available and total memory: psutil when importable and ``root`` is the real ``/proc``, else
    ``root/meminfo`` (``MemAvailable``, or ``MemFree + Buffers + Cached`` on old kernels)."""

    name = "memory"

    def __init__(self, root: str | Path = "/proc", use_psutil: bool | None = None) -> None:
        self.root = Path(root)
        real = self.root.resolve() == Path("/proc")
        self._ps = _import_psutil() if (use_psutil if use_psutil is not None else real) else None

    def read(self) -> dict[str, Any]:
        if self._ps is not None:
            try:
                vm = self._ps.virtual_memory()
                return {"mem_available_bytes": int(vm.available), "mem_total_bytes": int(vm.total)}
            except Exception as e:
                log.debug("telemetry: psutil.virtual_memory failed: %s", e)
        kb: dict[str, int] = {}
        for line in (_read_text(self.root / "meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                kb[key.strip()] = int(rest.split()[0])
        avail = kb.get("MemAvailable")
        if avail is None and "MemFree" in kb:
            avail = kb["MemFree"] + kb.get("Buffers", 0) + kb.get("Cached", 0)
        return {"mem_available_bytes": avail * 1024 if avail is not None else None,
                "mem_total_bytes": kb["MemTotal"] * 1024 if "MemTotal" in kb else None}


# ---------------------------------------------------------------------------------------------------------------------
# replay


def _load_trace(source: str | Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of a JSON list (or ``{"trace": [...]}``) or JSONL file (``#`` comment lines allowed)."""
    if isinstance(source, list):
        records, where = source, "trace"
    else:
        where = str(source)
        text = Path(source).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}:{n}: not a JSON record: {e.msg}") from None
        if data is not None:
            if isinstance(data, dict) and isinstance(data.get("trace"), list):
                data = data["trace"]
            records = data if isinstance(data, list) else [data]
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: record {i} is not an object: {r!r:.60}")
        t = r.get("t")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"{where}: record {i} needs a time \"t\" >= 0 in seconds, got {t!r}")
        for k, v in r.items():
            if k in _NUMERIC and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{where}: record {i} (t={t}): {k} must be a number or null, got {v!r}")
        out.append(r)
    out.sort(key=lambda r: r["t"])
    return out


class ReplayProvider:
    """Plays back a trace: a list of ``{"t": seconds, field: value, ...}`` records.

    The state at elapsed time ``e`` is every field's value from the latest record with ``t <= e``
    (step-hold, field by field), so a scripted trace only lists what changes:
    ``{"t": 0, "temperature_c": 45}, {"t": 60, "temperature_c": 85}``. Elapsed time is
    ``(clock() - start) * speed`` with ``start`` the construction (or :meth:`reset`) time. Fields that are
    not :class:`DeviceState` fields are reported under ``extra``. A malformed trace raises ValueError.
    """

    name = "replay"

    def __init__(self, source: str | Path | list[dict[str, Any]], clock: Clock | None = None,
                 speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"replay speed must be positive, got {speed}")
        self.records = _load_trace(source)
        self.clock: Clock = clock or time.monotonic
        self.speed = float(speed)
        self._times: list[float] = []
        self._states: list[dict[str, Any]] = []
        cur: dict[str, Any] = {}
        for r in self.records:
            for k, v in r.items():
                if k in ("t", "timestamp"):
                    continue
                if k in _FIELDS and k != "extra":
                    cur[k] = v
                else:
                    extra = dict(cur.get("extra", {}))
                    extra.update(v if k == "extra" and isinstance(v, dict) else {k: v})
                    cur["extra"] = extra
            if self._times and self._times[-1] == r["t"]:
                self._states[-1] = dict(cur)
            else:
                self._times.append(float(r["t"]))
                self._states.append(dict(cur))
        self.start = self.clock()

    def reset(self) -> None:
        """Restart the trace at t = 0."""
        self.start = self.clock()

    @property
    def elapsed(self) -> float:
        return (self.clock() - self.start) * self.speed

    @property
    def duration(self) -> float:
        """Time of the last record."""
        return self._times[-1] if self._times else 0.0

    @property
    def finished(self) -> bool:
        return self.elapsed > self.duration

    def at(self, t: float) -> dict[str, Any]:
        """The state at trace time ``t`` (empty before the first record)."""
        i = bisect.bisect_right(self._times, t) - 1
        if i < 0:
            return {}
        s = dict(self._states[i])
        for k in ("per_cpu_util", "thermal_zones", "extra", "cpu_affinity"):
            if isinstance(s.get(k), (list, dict)):
                s[k] = type(s[k])(s[k])  # callers may mutate their copy
        return s

    def read(self) -> dict[str, Any]:
        return self.at(self.elapsed)


# ---------------------------------------------------------------------------------------------------------------------
# the merged view


def default_providers() -> list[Provider]:
    """Every real provider at its standard location."""
    return [PsutilCPU(), CgroupCPU(), Thermal(), Battery(), Memory()]


class Telemetry:
    """Merges its providers' reports into a :class:`DeviceState`.

    Providers are read in order; a later provider's non-``None`` values win. A provider that raises is
    logged at debug level and skipped. ``min_interval`` seconds (default 0.25 for the real providers, 0
    for a replay) caches the last state, so callers may ask at every decode step: battery reads can cost
    milliseconds on some laptops.
    """

    def __init__(self, providers: list[Provider] | None = None, *, clock: Clock | None = None,
                 min_interval: float | None = None) -> None:
        self.providers: list[Provider] = default_providers() if providers is None else list(providers)
        self.clock: Clock = clock or time.time
        self.min_interval = (0.25 if providers is None else 0.0) if min_interval is None else float(min_interval)
        self._last: DeviceState | None = None
        self._last_at = -math.inf

    @classmethod
    def replay(cls, source: str | Path | list[dict[str, Any]], *, clock: Clock | None = None,
               speed: float = 1.0) -> Telemetry:
        """Telemetry that plays back a trace file (or list of records) against ``clock``."""
        clock = clock or time.monotonic
        return cls([ReplayProvider(source, clock=clock, speed=speed)], clock=clock, min_interval=0.0)

    def read(self) -> DeviceState:
        now = self.clock()
        if self._last is not None and now - self._last_at < self.min_interval:
            return self._last
        merged: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for p in self.providers:
            try:
                part = p.read()
            except Exception as e:  # a provider bug must not take the server down
                log.debug("telemetry: provider %s failed: %r", getattr(p, "name", p), e)
                continue
            for k, v in part.items():
                if k == "extra" and isinstance(v, dict):
                    extra.update(v)
                elif k not in _FIELDS:
                    extra[k] = v
                elif v is None or (isinstance(v, (list, dict)) and not v and k in merged):
                    continue  # unknown or empty never hides what an earlier provider knew
                else:
                    merged[k] = v
        merged.setdefault("timestamp", now)
        merged["extra"] = extra
        self._last, self._last_at = DeviceState(**merged), now
        return self._last


def record(telemetry: Telemetry, path: str | Path, seconds: float, interval: float = 1.0, *,
           clock: Clock = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """Sample ``telemetry`` every ``interval`` s for ``seconds`` s into a JSONL trace at ``path``.

    Each line is ``{"t": elapsed, ...}`` with the fields that changed since the previous line (the first
    line has every known field), so :class:`ReplayProvider` reproduces the samples. Lines are flushed as
    they are written: an interrupted recording is still a valid trace. Returns the number of lines.
    """
    if not seconds >= 0 or not interval > 0:
        raise ValueError(f"record needs seconds >= 0 and interval > 0, got {seconds} and {interval}")
    t0 = clock()
    prev: dict[str, Any] = {}
    n = 0
    with open(path, "w") as f:
        k = 0
        while True:
            st = telemetry.read().to_dict()
            st.pop("timestamp", None)
            if not st.get("extra"):
                st.pop("extra", None)
            t = clock() - t0
            line = {"t": round(t, 4)}
            line.update({key: v for key, v in st.items() if prev.get(key, None) != v})
            prev = st
            f.write(json.dumps(line) + "\n")
            f.flush()
            n += 1
            k += 1
            nxt = k * interval
            if nxt > seconds + 1e-9:
                break
            delay = nxt - (clock() - t0)
            if delay > 0:
                sleep(delay)
    log.debug("telemetry: recorded %d samples to %s", n, path)
    return n

"""Device telemetry and the precision controller (docs/control.md).

* :mod:`~bitdial.control.telemetry` -- :class:`DeviceState`, the real providers (CPU, cgroup quota,
  thermal zones, battery, memory), :class:`Telemetry`, trace replay and recording;
* :mod:`~bitdial.control.controller` -- :class:`Controller`: the dynamic-precision target per request and
  per decode step (rule, bandit or fixed policy; hysteresis; thermal and battery caps).
"""

from bitdial.control.controller import POLICIES, ControlConfig, Controller, Decision, RequestConstraints
from bitdial.control.telemetry import (Battery, CgroupCPU, DeviceState, Memory, Provider, PsutilCPU, ReplayProvider,
                                       Telemetry, Thermal, default_providers, record)

__all__ = ["POLICIES", "Battery", "CgroupCPU", "ControlConfig", "Controller", "Decision", "DeviceState", "Memory",
           "Provider", "PsutilCPU", "ReplayProvider", "RequestConstraints", "Telemetry", "Thermal",
           "default_providers", "record"]

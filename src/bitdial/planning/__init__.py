"""Sensitivity and hardware profiling, and budgeted mixed-precision plans (docs/planning.md).

* :mod:`~bitdial.planning.sensitivity` -- per-module, per-width quality costs (Fisher, output error,
  measured KL) and the profile file;
* :mod:`~bitdial.planning.device` -- this machine's latency/energy model, and shipped estimates of
  other edge devices (``devices/*.json``);
* :mod:`~bitdial.planning.planner` -- the integer program (and greedy fallback), plan storage in the
  artifact, :func:`plan_bits`;
* :mod:`~bitdial.planning.pareto` -- the size/latency/quality frontier;
* :mod:`~bitdial.planning.views` -- :func:`plan_table` and :func:`plan_heatmap`.
"""

from bitdial.planning.common import PlanError, ProfileError
from bitdial.planning.planner import (Budgets, Plan, delete_plan, load_plans, make_plan, parse_pins, plan_bits,
                                      save_plan)
from bitdial.planning.sensitivity import Profile, load_profile, profile_sensitivity, save_profile
from bitdial.planning.device import DeviceModel, builtin_devices, load_device, profile_device, save_device
from bitdial.planning.views import plan_heatmap, plan_table

__all__ = ["Budgets", "DeviceModel", "Plan", "PlanError", "Profile", "ProfileError", "builtin_devices", "delete_plan",
           "load_device", "load_plans", "load_profile", "make_plan", "parse_pins", "plan_bits", "plan_heatmap",
           "plan_table", "profile_device", "profile_sensitivity", "save_device", "save_plan", "save_profile"]

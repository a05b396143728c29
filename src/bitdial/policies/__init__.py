"""Precision policies that act at run time: dynamic per-token precision after DP-LLM (docs/dynamic.md).

* :mod:`~bitdial.policies.dynamic` -- the policy (per module: widths l/h, learned p, estimator,
  threshold), its storage in the artifact, and the run-time attachment with target switching;
* :mod:`~bitdial.policies.calibrate` -- `bitdial calibrate`: memory maxima, learned precisions,
  estimators and thresholds on calibration text.
"""

from bitdial.policies.dynamic import (DynamicPolicy, DynamicRuntime, ModuleRule, PolicyError, attach, delete_policy,
                                      load_policy, policy_max_bits, policy_name, save_policies, stored_policies,
                                      stored_targets)

__all__ = ["DynamicPolicy", "DynamicRuntime", "ModuleRule", "PolicyError", "attach", "delete_policy", "load_policy",
           "policy_max_bits", "policy_name", "save_policies", "stored_policies", "stored_targets"]

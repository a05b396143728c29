"""bitdial: any-precision LLM inference on CPUs (one bitplane artifact, every width from 2 to 8 bits)."""

import os as _os
import sys as _sys

# torch's OpenMP runtime (GNU libgomp in the CPU wheels) reads its wait policy once, when it loads. Its
# default spins after every parallel region, which on a small CPU fights the native kernels' own thread
# pool (prefill alternates native tile rebuilds and torch GEMMs) and, when another process holds a core,
# makes every region wait out a scheduler slice: under a one-core competitor the median time to first
# token of fixed 4 bits was 9.8 s with the default and 0.35 s with PASSIVE (benchmarks/results/
# adaptive_control_zen4*.json). PASSIVE sleeps at once; prefill measured faster with it, idle too
# (docs/kernels.md, "Threads"). Only a default: an OMP_WAIT_POLICY the user set wins, and nothing changes
# if torch was imported before bitdial.
# The variable is inherited by child processes: ``OMP_WAIT_POLICY_SET_BY_BITDIAL`` tells whoever starts
# another OpenMP program (benchmarks/e2e.py runs llama-bench) that it was not the user's choice.
OMP_WAIT_POLICY_SET_BY_BITDIAL = "torch" not in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ
if OMP_WAIT_POLICY_SET_BY_BITDIAL:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

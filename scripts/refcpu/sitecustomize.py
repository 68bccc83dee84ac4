"""Python runs this at start-up when scripts/refcpu is on PYTHONPATH (the test suite puts it there,
.cargo/nibble-defaults.toml): pin the reference stack's CPU paths as `NIBBLE_REF_CPU` says."""

import os

import nibble_refcpu

# Unset or empty: nothing pinned here, so that a script can still pin itself (the golden scripts).
if os.environ.get("NIBBLE_REF_CPU"):
    nibble_refcpu.apply()

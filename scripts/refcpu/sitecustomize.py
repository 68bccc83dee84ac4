"""Python runs this at start-up when scripts/refcpu is on PYTHONPATH (the test suite puts it there,
.cargo/nibble-defaults.toml): pin the reference stack's CPU paths as `NIBBLE_REF_CPU` says, avx2
when it is unset (the suite's default)."""

import nibble_refcpu

nibble_refcpu.apply(default="avx2")

"""Kernel tests run the triton kernels in triton's CPU interpreter unless a GPU is there.

TRITON_INTERPRET must be set before triton decorates the kernels (at import of
mixloom.kernels.segmented), hence here, at conftest import. scripts/test.sh exports it too;
bench/gpu.sh sets TRITON_INTERPRET=0 to run these same tests on the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

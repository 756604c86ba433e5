"""The CPU tiers never import torch, and the wire module's constants agree with the kernels'."""

from __future__ import annotations

import subprocess
import sys

import kernels
from worker import wire

CPU_TIER_MODULES = ("deployments.ingress", "deployments.preprocessor", "deployments.router",
                    "deployments.gateway", "deployments.prefix_index", "deployments.cli",
                    "deployments.local", "preprocess", "worker.checkpoint", "worker.wire")


def test_cpu_tiers_import_no_torch():
    script = (f"import sys\nfor m in {CPU_TIER_MODULES!r}: __import__(m)\n"
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton',"
              " 'kernels'))\nprint(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "", f"CPU tiers imported {result.stdout.strip()[:300]}"


def test_page_size_is_the_msa_block():
    assert wire.BLOCK_SIZE == kernels.BLOCK_SIZE

"""What the bench tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cpu_generation_args() -> list[str]:
    """`bench generation` options for a seconds-long CPU run of every code path: the tiny shape, the compiled paths
    through dynamo's eager backend (the static-cache + torch.compile plumbing, and hooks under dynamo, without minutes
    of inductor code generation) and small ceiling probes."""
    return [
        "generation",
        "--shape", "tiny",
        "--compile-backend", "eager",
        "--compile-mode", "default",
        "--copy-bytes", str(4 * 2**20),
        "--matmul-size", "64",
        "--device", "cpu",
    ]  # fmt: skip

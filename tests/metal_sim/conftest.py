"""The simulator compiles kernels with g++ (>= 12 for _Float16 on x86-64); without it these tests skip."""

import shutil

import pytest

from .build import CXX


@pytest.fixture(autouse=True)
def _need_compiler():
    if shutil.which(CXX) is None:
        pytest.skip(f"{CXX} not found: the Metal simulator compiles kernels with it (set ZKV_METAL_SIM_CXX)")

"""Shared test configuration: GPU tests carry the `gpu` marker and skip without a GPU; the
`assets` fixture is the demo model and its adapters (moelora.demo.assets), built once per module
that asks for it (a module may define its own `assets` instead)."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist every worker is a process with torch's default of one intra-op thread per
# core: 16 workers on 16 cores ran 256 threads and the float64 references crawled. One each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _gpu_present() -> bool:
    try:
        import moelora
    except ImportError:
        return False
    return torch.cuda.is_available() and moelora.cuda_available()


def pytest_collection_modifyitems(config, items):
    if _gpu_present():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of moelora")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(model directory, {adapter name: adapter directory}) of the demo."""
    from moelora.demo.assets import build_demo_assets

    return build_demo_assets(str(tmp_path_factory.mktemp("demo")))

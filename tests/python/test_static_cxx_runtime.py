"""libmoelora and _C built with a statically linked libstdc++, loaded after torch.

The GPU machine's g++ links libstdc++.a into every shared object. Its symbols, exported, mixed
with the shared libstdc++ that torch had loaded, and number formatting through an iostream then
crashed the process (there) or silently dropped the rest of the message (here): every native
error that described a tensor ("got int64[3, 2] strides [2, 1] on cpu") was lost. The library
now formats without iostreams and links with --exclude-libs,ALL, which keeps such a runtime
private. This test builds that configuration (no CUDA) and raises such an error from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_RAISE_A_DESCRIBED_ERROR = """
import sys
import torch  # first, as in any real process: the shared libstdc++ is loaded before ours
sys.path.insert(0, sys.argv[1])
from moelora import _C, ops
assert _C.__file__.startswith(sys.argv[1]), _C.__file__
try:
    ops.moe_lora_align(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int32),
                       4, 1, 8)
except Exception as error:
    print(type(error).__name__, error)
"""


def _tools_missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "--exclude-libs and -static-libstdc++ are GNU-linker / Linux options"
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 not installed"
    return None


@pytest.mark.slow
def test_native_errors_survive_a_statically_linked_cxx_runtime(tmp_path):
    missing = _tools_missing()
    if missing:
        pytest.skip(missing)
    import pybind11

    build = tmp_path / "build"
    static = "-static-libstdc++"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DMOELORA_CUDA=OFF",
         "-DMOELORA_BUILD_PYTHON=ON", "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_SHARED_LINKER_FLAGS={static}", f"-DCMAKE_MODULE_LINKER_FLAGS={static}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"],
        check=False, capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    built = subprocess.run(["cmake", "--build", str(build), "--target", "_C",
                            f"-j{os.cpu_count() or 2}"], check=False, capture_output=True,
                           text=True)
    if built.returncode != 0 and "static-libstdc++" in built.stdout + built.stderr:
        pytest.skip("this toolchain cannot link libstdc++ statically")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-2000:]

    # A package of this checkout's Python sources with the native parts just built.
    package = tmp_path / "site" / "moelora"
    shutil.copytree(ROOT / "python" / "moelora", package,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "lib"))
    module = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    shutil.copy(build / module, package / module)
    (package / "lib").mkdir()
    shutil.copy(build / "libmoelora.so", package / "lib" / "libmoelora.so")
    needed = subprocess.run(["ldd", str(package / "lib" / "libmoelora.so")],
                            check=False, capture_output=True, text=True).stdout
    assert "libstdc++" not in needed, "the build was meant to link libstdc++ statically"

    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _RAISE_A_DESCRIBED_ERROR,
                           str(tmp_path / "site")], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-3000:]
    assert ("InvalidArgument moe_lora_align: topk_ids must be int32, got int64[3, 2] strides "
            "[2, 1] on cpu") in done.stdout, done.stdout

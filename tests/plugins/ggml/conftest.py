"""The oracle: libggml's own quantizers, built once from llama-cpp-python's sdist and cached."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("ENIGMA_ORACLE_CACHE", Path.home() / ".cache" / "enigma-test-oracles"))


def build_libggml(cache: Path) -> Path:
    """libggml-base.so of llama.cpp as llama-cpp-python LLAMA_CPP_PYTHON vendors it (about a minute)."""
    target = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "libggml-base.so"
    if target.exists():
        return target
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed")
    with tempfile.TemporaryDirectory(prefix="enigma-ggml-oracle-") as scratch:
        work = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work)], check=True, capture_output=True,
                       timeout=600)
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = work / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF"], check=True, capture_output=True, timeout=600)
        subprocess.run(["cmake", "--build", str(build), "--target", "ggml-base", "-j", str(os.cpu_count() or 2)],
                       check=True, capture_output=True, timeout=1200)
        built = next(build.rglob("libggml-base.so"))
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_suffix(".tmp")
        shutil.copy(built.resolve(), staged)
        os.replace(staged, target)
    return target


@pytest.fixture(scope="session")
def libggml() -> ctypes.CDLL:
    """llama.cpp's ggml base library (``ggml_quantize_chunk``); the tests skip, saying why, if it cannot be built."""
    try:
        path = build_libggml(CACHE)
    except (RuntimeError, OSError, subprocess.SubprocessError, StopIteration) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"libggml (the oracle) could not be built: {exc} {detail[-300:]!r}")
    library = ctypes.CDLL(str(path))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return library

"""The oracle: libggml's own quantizers, built once from llama-cpp-python's sdist and cached."""

from __future__ import annotations

import ctypes
import hashlib
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


def llama_cpp_source(work: Path) -> Path:
    """llama.cpp's source tree as llama-cpp-python LLAMA_CPP_PYTHON vendors it, unpacked from its sdist into
    ``work`` (pip download; pip's cache makes it quick after the first time)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work)], check=True, capture_output=True,
                   timeout=600)
    with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as archive:
        archive.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"


def build_libggml(cache: Path) -> Path:
    """libggml-base.so of llama.cpp as llama-cpp-python LLAMA_CPP_PYTHON vendors it (about a minute)."""
    target = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "libggml-base.so"
    if target.exists():
        return target
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed")
    with tempfile.TemporaryDirectory(prefix="enigma-ggml-oracle-") as scratch:
        work = Path(scratch)
        source = llama_cpp_source(work)
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


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


GGML_CPU_FEATURES = {
    "GGML_AVX": {"avx"}, "GGML_AVX2": {"avx2"}, "GGML_FMA": {"fma"}, "GGML_F16C": {"f16c"}, "GGML_BMI2": {"bmi2"},
    "GGML_AVX512": {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"},
    "GGML_AVX512_VBMI": {"avx512f", "avx512vbmi"}, "GGML_AVX512_VNNI": {"avx512f", "avx512_vnni"},
    "GGML_AVX512_BF16": {"avx512f", "avx512_bf16"}, "GGML_AVX_VNNI": {"avx_vnni"},
}
"""Each of ggml's x86 options and the /proc/cpuinfo flags it needs. An option is turned on only where this CPU
has every one of them: CI once died of SIGILL on an AMD EPYC with AVX-512 VNNI but not the VEX-coded AVX-VNNI,
which the build had turned on with the AVX-512 set as a whole."""


def llama_cpp_flags(cpu_flags: set[str]) -> tuple[str, ...]:
    """CMake options for llama.cpp built for the CPU with ``cpu_flags``: its vector extensions named one by
    one rather than -march=native, since a native build also turns on ggml's AMX kernels, whose Q8_0 path
    crashes in a sandbox without AMX tile permission."""
    vector = tuple(f"{option}=ON" for option, needs in GGML_CPU_FEATURES.items() if needs <= cpu_flags)
    return ("GGML_NATIVE=OFF", *vector, "LLAVA_BUILD=OFF", "LLAMA_BUILD_TOOLS=OFF", "LLAMA_BUILD_EXAMPLES=OFF",
            "LLAMA_BUILD_TESTS=OFF", "LLAMA_CURL=OFF")


LLAMA_CPP_FLAGS = llama_cpp_flags(_cpu_flags())


def llama_cpp_site(cache: Path) -> Path:
    """llama-cpp-python LLAMA_CPP_PYTHON (llama.cpp itself, as a library) built from its sdist once and unpacked
    into the cache: about 4 minutes here with llama.cpp's tools and examples left out. The build's folder is
    named after the options, so a cache carried to a CPU with fewer extensions is never loaded there."""
    options = hashlib.sha256(" ".join(LLAMA_CPP_FLAGS).encode()).hexdigest()[:12]
    build = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / f"cpu-{options}"
    site = build / "site"
    if (site / "llama_cpp" / "__init__.py").exists():
        return site
    wheels = build / "wheels"
    wheel = next(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"), None)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        flags = " ".join(f"-D{flag}" for flag in LLAMA_CPP_FLAGS)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--no-binary", ":all:",
                        "-q",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-w", str(wheels)], check=True, capture_output=True,
                       timeout=2400, env={**os.environ, "CMAKE_ARGS": flags,
                                          "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
        wheel = next(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    import zipfile

    staged = site.with_name("site.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(staged)
    shutil.rmtree(site, ignore_errors=True)
    os.replace(staged, site)
    return site


@pytest.fixture(scope="session")
def llama_cpp():
    """The ``llama_cpp`` module (llama.cpp through llama-cpp-python's ctypes binding): the installed one, else one
    built into the cache. The tests skip, saying why, if it cannot be built."""
    try:
        import llama_cpp as installed

        return installed
    except ImportError:
        pass
    try:
        site = llama_cpp_site(CACHE)
    except (RuntimeError, OSError, subprocess.SubprocessError, StopIteration) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"llama.cpp (the oracle) could not be built: {exc} {detail[-300:]!r}")
    sys.path.insert(0, str(site))
    import llama_cpp as built

    return built


def llama_cpp_converter(cache: Path) -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` (with its ``conversion`` package and vendored ``gguf-py``) from
    the same sdist, unpacked into the cache: how most GGUF files on the hub were made."""
    target = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "convert"
    if (target / "convert_hf_to_gguf.py").exists():
        return target / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory(prefix="enigma-ggml-convert-") as scratch:
        work = Path(scratch)
        source = llama_cpp_source(work)
        staged = work / "convert"
        staged.mkdir()
        shutil.copy(source / "convert_hf_to_gguf.py", staged)
        for package in ("conversion", "gguf-py"):
            shutil.copytree(source / package, staged / package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staged), target)
    return target / "convert_hf_to_gguf.py"


@pytest.fixture(scope="session")
def convert_hf_to_gguf() -> Path:
    """The path of llama.cpp's converter script; the tests skip, saying why, if it cannot be fetched."""
    try:
        return llama_cpp_converter(CACHE)
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        pytest.skip(f"llama.cpp's converter (the oracle) could not be fetched: {exc}")

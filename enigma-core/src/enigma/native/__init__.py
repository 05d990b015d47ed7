"""Native CPU kernels, compiled for this machine on first use.

On CPU, a decode step is a stream of matrix-vector products: each token reads
every weight once, so its speed is the memory bandwidth the kernel reaches.
The plain loop in ``kernels.c``, vectorised by the compiler, comes close to
all of it. For one row, oneDNN is 10-35 % slower here and MKL (``F.linear``)
50 %; for two to eight rows oneDNN takes twice as long (see BENCHMARKS.md,
``benchmarks/cpu_linear.py``). Decode attention is the other stream: each
sequence's keys and values, read here once through its block table with an
online softmax (``benchmarks/decode_attention.py``).

The library is compiled with the system's C compiler (``$CC``, else ``cc``)
for this CPU (``-O3 -march=native``, with OpenMP when the compiler has it; it
then shares torch's OpenMP runtime and threads), once, and cached in enigma's
cache directory under a name that hashes the source, the command and the CPU.
Where there is no compiler, the compile fails, or the setting
``engine.native_kernels`` is false (``ENIGMA_ENGINE__NATIVE_KERNELS=false``),
:func:`kernels` returns None and callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = "kernels.c"
COMPILE_TIMEOUT_S = 120


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded here."""


class NativeKernels:
    """The loaded library, with a torch-facing function per kernel."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            library = ctypes.CDLL(str(path))  # ctypes releases the GIL during each call
        except OSError as error:
            raise NativeBuildError(f"could not load {path}: {error}; delete it to rebuild") from error
        self.library = library
        """The ctypes library, for callers with their own bindings (:mod:`enigma.native.decoder`)."""
        self.f32_matmul = ctypes.cast(library.enigma_f32_matmul, ctypes.c_void_p).value
        """Address of the float32 matmul in the native decoder's matmul signature (no bias)."""
        self.bf16_matmul = ctypes.cast(library.enigma_bf16_matmul, ctypes.c_void_p).value
        """The same for bfloat16 weights (widened as they are read; activations stay float32)."""
        self._linear = library.enigma_linear
        self._linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
        self._linear.restype = None
        self._linear_bf16 = library.enigma_linear_bf16
        self._linear_bf16.argtypes = self._linear.argtypes
        self._linear_bf16.restype = None
        self._decode_attention = library.enigma_decode_attention
        self._decode_attention.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # query, shape
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,                                   # cache, pool
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,                                  # tables, lengths
            ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int32]
        self._decode_attention.restype = ctypes.c_int64

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias`` for float32 CPU tensors, as ``F.linear``; ``weight``
        (``[out, in]``) and ``bias`` contiguous. Made for few rows of ``x``: it reads
        the weights once per two rows. ``weight`` may also be bfloat16 (widened as it
        is read; ``x``, ``bias`` and the result stay float32)."""
        if not (x.dtype == torch.float32 and weight.dtype in (torch.float32, torch.bfloat16) and x.is_cpu
                and weight.is_cpu and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu))):
            described = [f"x {x.dtype} on {x.device}", f"weight {weight.dtype} on {weight.device}"]
            if bias is not None:
                described.append(f"bias {bias.dtype} on {bias.device}")
            raise ValueError(f"native linear takes float32 CPU tensors, not {', '.join(described)}; "
                             "use torch.nn.functional.linear")
        out_features, in_features = weight.shape
        if (x.shape[-1] != in_features or not weight.is_contiguous()
                or (bias is not None and (not bias.is_contiguous() or bias.shape != (out_features,)))):
            raise ValueError(f"native linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                             f"{None if bias is None else tuple(bias.shape)} do not match, or weight or bias "
                             "is not contiguous")
        x = x.contiguous()
        rows = x.numel() // in_features if in_features else 0
        y = x.new_empty((*x.shape[:-1], out_features))
        kernel = self._linear_bf16 if weight.dtype == torch.bfloat16 else self._linear
        kernel(x.data_ptr(), rows, in_features, weight.data_ptr(), out_features,
               None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y


    def decode_attention(self, query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, *, window: int | None, scale: float) -> torch.Tensor:
        """One query per sequence (``query`` ``[seqs, heads, dim]``) over the paged
        ``kv_cache`` (``[2, kv_heads, num_blocks, block_size, dim]``, the torch
        backend's layout), read in place through ``block_tables`` (``[seqs,
        max_blocks]``): sequence ``s`` sees its ``seq_lens[s]`` cached positions,
        or the last ``window`` of them. All float32 but the int64 tables and
        lengths, on CPU, contiguous. Returns ``[seqs, heads, dim]``."""
        num_seqs, heads, dim = query.shape
        _, kv_heads, num_blocks, block_size, cache_dim = kv_cache.shape
        if not (query.dtype == kv_cache.dtype == torch.float32 and block_tables.dtype == seq_lens.dtype == torch.int64
                and query.is_cpu and kv_cache.is_cpu and block_tables.is_cpu and seq_lens.is_cpu):
            raise ValueError(f"native decode attention takes float32 query and cache and int64 tables and lengths, "
                             f"on CPU; got {query.dtype}, {kv_cache.dtype}, {block_tables.dtype}, {seq_lens.dtype}")
        if (cache_dim != dim or heads % kv_heads or block_tables.shape[0] != num_seqs
                or seq_lens.shape != (num_seqs,) or not kv_cache.is_contiguous()):
            raise ValueError(f"native decode attention: query {tuple(query.shape)}, cache {tuple(kv_cache.shape)}, "
                             f"tables {tuple(block_tables.shape)} and lengths {tuple(seq_lens.shape)} do not fit "
                             "together, or the cache is not contiguous")
        query, block_tables, seq_lens = query.contiguous(), block_tables.contiguous(), seq_lens.contiguous()
        out = query.new_empty(query.shape)
        bad = self._decode_attention(query.data_ptr(), num_seqs, heads, kv_heads, dim,
                                     kv_cache.data_ptr(), num_blocks, block_size,
                                     block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
                                     window or 0, scale, out.data_ptr(), torch.get_num_threads())
        if bad:
            raise ValueError(f"native decode attention: {bad} (sequence or run of its rows, KV head) pairs "
                             "have a block table shorter than their length or naming a block outside the pool of "
                             f"{num_blocks}")
        return out


_loaded: dict[str, NativeKernels | None] = {}
"""The process's kernels once :func:`kernels` has looked (tests swap this dict)."""


def kernels() -> NativeKernels | None:
    """The kernels for this process, built or taken from the cache on first call;
    None when they are switched off or cannot be built here (logged once, with why)."""
    if "kernels" not in _loaded:
        _loaded["kernels"] = _load()
    return _loaded["kernels"]


def _load() -> NativeKernels | None:
    from enigma.config import load_config
    from enigma.paths import get_paths

    if not load_config().config.engine.native_kernels:
        return None
    try:
        return NativeKernels(build(get_paths().cache_dir / "native"))
    except NativeBuildError as error:
        log.warning("native CPU kernels unavailable, using torch's (engine.native_kernels = false skips them): %s",
                    error)
        return None


def compiler() -> list[str]:
    """The C compiler command: ``$CC``, else ``cc``."""
    return shlex.split(os.environ.get("CC") or "cc")


def compile_commands(source: Path, target: Path, flags: tuple[str, ...] = ()) -> list[list[str]]:
    """Commands to try in order: for this CPU with OpenMP threads; then, for a
    compiler without OpenMP (such as Apple's clang), single-threaded; then, for
    one that does not know this CPU, for the architecture's baseline. ``flags`` go into each."""
    arch = "-march=native" if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else "-mcpu=native"
    base = [*compiler(), "-O3", *flags, "-shared", "-fPIC", str(source), "-o", str(target)]
    return [[*base, arch, "-fopenmp", "-lm"], [*base, arch, "-fopenmp-simd", "-lm"], [*base, "-fopenmp", "-lm"]]


def cpu_signature() -> str:
    """What identifies this CPU's instruction set: ``-march=native`` code must not
    run on another CPU sharing the cache directory."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(cache_dir: Path, *, package: str = __package__, source_name: str = SOURCE, name: str = "enigma-kernels",
          flags: tuple[str, ...] = (), headers: tuple[str, ...] = ()) -> Path:
    """The compiled library in ``cache_dir``: compiled there first if absent.

    ``package``'s ``source_name`` (a plugin's own C file too) is compiled with
    :func:`compile_commands` and ``flags``, beside the package's ``headers``
    (``#include "x.h"``), which are part of the cache key. The library is
    written under a temporary name and renamed into place, so concurrent
    builds never load a half-written file.
    """
    files = {file: resources.files(package).joinpath(file).read_bytes() for file in (source_name, *headers)}
    if shutil.which(compiler()[0]) is None:
        raise NativeBuildError(f"no C compiler: {compiler()[0]!r} is not on PATH (install gcc or clang, or set CC)")
    digest = hashlib.sha256()
    for part in (*files.values(), repr(compile_commands(Path("x.c"), Path("x.so"), flags)).encode(),
                 cpu_signature().encode()):
        digest.update(part)
    target = cache_dir / f"{name}-{digest.hexdigest()[:20]}.so"
    if target.exists():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as scratch:
            source_file, built = Path(scratch) / source_name, Path(scratch) / target.name
            for file, data in files.items():
                (Path(scratch) / file).write_bytes(data)
            errors = []
            for command in compile_commands(source_file, built, flags):
                result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
                if result.returncode == 0:
                    os.replace(built, target)
                    log.info("compiled %s: %s", name, shlex.join(command))
                    return target
                errors.append(f"`{shlex.join(command)}` failed: {result.stderr.strip()[-500:]}")
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"could not compile into {cache_dir}: {error}") from error
    raise NativeBuildError("; ".join(errors))

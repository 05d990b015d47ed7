"""EXL2 Linears in enigma: ``y = x Wᵀ + b`` with W kept in its packed tensors.

On the CPU, ``exl2_matmul.c`` multiplies up to 16 rows (decode) straight from
the packed words; more rows (a prefill) dequantize a slice of columns at a
time into a reused buffer and multiply it (the activations permuted once).
On CUDA a Triton kernel unpacks each tile of the weight inside the matmul
(:mod:`enigma_exl2.triton_matmul`). Anywhere else — or with
``engine.native_kernels = false`` — the weight is dequantized with tensor
operations and ``F.linear`` runs. Every path computes the weight as
:func:`enigma_exl2.layout.reference_dequantize` does.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import torch
from torch import nn

from enigma.errors import BadRequestError
from enigma_exl2.layout import COLUMN_ALIGN, packed_rows

NATIVE_MAX_ROWS = 16
CHUNK_BYTES = 4 << 20
_native: dict[str, Any] = {}
_scratch = threading.local()
log = logging.getLogger(__name__)


class _Weight(ctypes.Structure):
    _fields_ = [("q_weight", ctypes.c_void_p), ("q_scale", ctypes.c_void_p), ("scale_max", ctypes.c_void_p),
                ("group_bits", ctypes.c_void_p), ("group_rows", ctypes.c_void_p), ("group_qrow", ctypes.c_void_p),
                ("perm", ctypes.c_void_p), ("groups", ctypes.c_int64), ("columns", ctypes.c_int64),
                ("in_", ctypes.c_int64), ("out", ctypes.c_int64)]


def native_library() -> Any:
    """The compiled ``exl2_matmul.c`` (ctypes), or None where it cannot be built or native kernels are off."""
    if "library" not in _native:
        _native["library"] = _load_native()
    return _native["library"]


def _load_native() -> Any:
    from enigma.config import load_config
    from enigma.native import NativeBuildError, build
    from enigma.paths import get_paths

    if not load_config().config.engine.native_kernels:
        return None
    try:
        path = build(get_paths().cache_dir / "native", package=__package__, source_name="exl2_matmul.c",
                     name="enigma-exl2-matmul")
        library = ctypes.CDLL(str(path))
    except (NativeBuildError, OSError) as error:
        log.warning("EXL2 native kernels unavailable, dequantizing per matmul: %s", error)
        return None
    library.enigma_exl2_qmatmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int]
    library.enigma_exl2_qmatmul.restype = ctypes.c_int
    library.enigma_exl2_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                               ctypes.c_int]
    library.enigma_exl2_dequantize.restype = ctypes.c_int
    return library


class Plan:
    """What the kernels read besides the stored tensors, derived once per device: the group table, the
    permutation, and per stored row its word, shift, width and group."""

    def __init__(self, module: EXL2Linear) -> None:
        from enigma_exl2.layout import read_groups

        device = module.q_weight.device
        groups = read_groups(module.q_groups.cpu().numpy(), module.q_weight.shape[0], module.in_features)
        needed = groups[-1].first_qrow + packed_rows(groups[-1].rows, groups[-1].bits)
        if needed != module.q_weight.shape[0]:
            raise BadRequestError(f"q_weight has {module.q_weight.shape[0]} rows; its groups take {needed}")
        self.groups = groups
        self.perm = torch.argsort(module.q_invperm.to(device=device, dtype=torch.int64))
        row_word, row_shift, row_bits, row_group = [], [], [], []
        for index, group in enumerate(groups):
            for i in range(group.rows):
                word, shift = divmod(i * group.bits, 32)
                row_word.append(group.first_qrow + word)
                row_shift.append(shift)
                row_bits.append(group.bits)
                row_group.append(index)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        self.row_word, self.row_shift = as_tensor(row_word), as_tensor(row_shift)
        self.row_bits, self.row_group = as_tensor(row_bits), as_tensor(row_group)
        self.scale_max = module.q_scale_max.to(device=device, dtype=torch.float16).float() / 256
        self.group_bits = as_tensor([g.bits for g in groups])
        self.group_rows = as_tensor([g.rows for g in groups])
        self.group_qrow = as_tensor([g.first_qrow for g in groups])
        self._scales: torch.Tensor | None = None
        self.descriptor: torch.Tensor | None = None
        if device.type == "cpu":
            weight = _Weight(module.q_weight.data_ptr(), module.q_scale.data_ptr(), self.scale_max.data_ptr(),
                             self.group_bits.data_ptr(), self.group_rows.data_ptr(), self.group_qrow.data_ptr(),
                             self.perm.data_ptr(), len(groups), module.q_weight.shape[1], module.in_features,
                             module.out_features)
            self.descriptor = torch.frombuffer(bytearray(bytes(weight)), dtype=torch.uint8)
            # whoever holds the descriptor (the native decoder) holds what its pointers point at
            self.descriptor.keepalive = (module.q_weight, module.q_scale, self.scale_max, self.group_bits,
                                         self.group_rows, self.group_qrow, self.perm)
        self.sources = (module.q_weight, module.q_scale, module.q_scale_max, module.q_groups, module.q_invperm)

    def current(self, module: EXL2Linear) -> bool:
        """Whether the module still holds the tensors this plan read (a reload or ``.to()`` replaces them)."""
        now = (module.q_weight, module.q_scale, module.q_scale_max, module.q_groups, module.q_invperm)
        return all(a is b for a, b in zip(now, self.sources))

    def scales(self, q_scale: torch.Tensor) -> torch.Tensor:
        """float32 ``[groups, columns]``: ``code² · scale_max / 256``."""
        if self._scales is None:
            shifts = torch.arange(0, 32, 4, device=q_scale.device, dtype=torch.int64)
            codes = ((q_scale.to(torch.int64)[:, :, None] >> shifts) & 15) + 1
            codes = codes.reshape(q_scale.shape[0], -1).float()
            self._scales = codes * codes * self.scale_max[:, None]
        return self._scales


def dequantize(module: EXL2Linear, plan: Plan) -> torch.Tensor:
    """The stored weight ``[in, columns]`` float32 in stored row order, with tensor operations (any device)."""
    words = module.q_weight.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:1])])
    index = plan.row_word.long()
    stream = words[index] | (words[index + 1] << 32)
    mask = (1 << plan.row_bits.long()) - 1
    values = (stream >> plan.row_shift.long()[:, None]) & mask[:, None]
    zero = (1 << (plan.row_bits.long() - 1))[:, None]
    return (values - zero).float() * plan.scales(module.q_scale)[plan.row_group.long()]


class EXL2Linear(nn.Module):
    """A Linear held as exllamav2's tensors (``q_weight``, ``q_scale``, ``q_scale_max``, ``q_groups``,
    ``q_invperm``, and a ``bias`` where it has one), loaded by name from an EXL2 folder."""

    keeps_dtype = True

    def __init__(self, in_features: int, out_features: int, *, qrows: int, groups: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        columns = -(-out_features // COLUMN_ALIGN) * COLUMN_ALIGN
        self.register_buffer("q_weight", torch.empty(qrows, columns, dtype=torch.int32, device=device))
        self.register_buffer("q_scale", torch.empty(groups, columns // 8, dtype=torch.int32, device=device))
        self.register_buffer("q_scale_max", torch.empty(groups, dtype=torch.float16, device=device))
        self.register_buffer("q_groups", torch.empty(2 * groups, dtype=torch.int16, device=device))
        self.register_buffer("q_invperm", torch.empty(in_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.__dict__["_plan"] = None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], in_features: int, out_features: int) -> EXL2Linear:
        """A module holding ``tensors`` (a quantizer's output, or one Linear read from a file)."""
        module = cls(in_features, out_features, qrows=tensors["q_weight"].shape[0],
                     groups=tensors["q_scale_max"].shape[0], bias="bias" in tensors, device="meta")
        for name in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm"):
            setattr(module, name, tensors[name].clone())
        if "bias" in tensors:
            module.bias = nn.Parameter(tensors["bias"].float().clone(), requires_grad=False)
        return module

    def plan(self) -> Plan:
        """The derived tables for the tensors held now (made again after a reload or a move)."""
        plan = self.__dict__["_plan"]
        if plan is None or not plan.current(self):
            plan = self.__dict__["_plan"] = Plan(self)
        return plan

    def weight_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` (nn.Linear's layout)."""
        plan = self.plan()
        stored = dequantize(self, plan)
        return stored[self.q_invperm.long(), :self.out_features].T.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan()
        rows = x.numel() // self.in_features if self.in_features else 0
        flat = x.reshape(rows, self.in_features)
        if x.is_cpu and not torch.is_grad_enabled() and (library := native_library()) is not None:
            y = _native_linear(library, plan, flat.float().contiguous(), self.out_features)
        elif x.is_cuda and not torch.is_grad_enabled() and _triton_ready():
            from enigma_exl2.triton_matmul import exl2_matmul

            y = exl2_matmul(flat.float()[:, plan.perm].contiguous(), self, plan)
        else:
            y = flat.float()[:, plan.perm] @ dequantize(self, plan)[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def native_projection(self) -> Any:
        """This Linear in the core's native decoder: the packed kernel for up to 16 rows; None off the CPU or
        without the compiled library."""
        library = native_library()
        if library is None or not self.q_weight.is_cpu or (self.bias is not None and
                                                           self.bias.dtype != torch.float32):
            return None
        from enigma.native.decoder import NativeProjection

        plan = self.plan()
        return NativeProjection(function=ctypes.cast(library.enigma_exl2_qmatmul, ctypes.c_void_p).value,
                                weight=plan.descriptor, in_features=self.in_features,
                                out_features=self.out_features,
                                bias=None if self.bias is None else self.bias.detach(),
                                scratch_bytes_per_row=4 * self.in_features, max_rows=NATIVE_MAX_ROWS)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, EXL2"


def _native_linear(library: Any, plan: Plan, x: torch.Tensor, out_features: int) -> torch.Tensor:
    rows, in_features = x.shape
    threads = torch.get_num_threads()
    descriptor = plan.descriptor.data_ptr()
    if 0 < rows <= NATIVE_MAX_ROWS:
        scratch = torch.empty(rows * in_features, dtype=torch.float32)
        y = torch.empty(rows, out_features, dtype=torch.float32)
        if library.enigma_exl2_qmatmul(0, descriptor, out_features, in_features, x.data_ptr(), rows,
                                       scratch.data_ptr(), y.data_ptr(), threads):
            raise BadRequestError(f"the EXL2 kernel refused a [{rows}, {in_features}] input")
        return y
    permuted = x[:, plan.perm]
    step = max(COLUMN_ALIGN, CHUNK_BYTES // (4 * in_features) // COLUMN_ALIGN * COLUMN_ALIGN)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < step * in_features:
        buffer = _scratch.buffer = torch.empty(step * in_features, dtype=torch.float32)
    y = torch.empty(rows, out_features, dtype=torch.float32)
    for start in range(0, out_features, step):
        end = min(start + step, out_features)
        piece = buffer[:(end - start) * in_features].view(in_features, end - start)
        library.enigma_exl2_dequantize(descriptor, start, end, piece.data_ptr(), threads)
        y[:, start:end] = permuted @ piece
    return y


def _triton_ready() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

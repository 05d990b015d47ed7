"""The cuda-paged plugin's settings: ``[plugins.cuda-paged]`` in the config file."""

import attrs

from enigma.config import setting


def _fraction(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
"""vLLM's names: ``auto`` stores the model's dtype, ``fp8`` is ``fp8_e4m3``."""


def _batch(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024


@attrs.define
class CudaPagedSettings:
    cuda_graphs: bool = setting(True, allowed="true or false", check=lambda v: isinstance(v, bool),
                                doc="replay decode steps from CUDA graphs (false: every step eager, as vLLM's "
                                    "enforce_eager)")
    max_graph_batch: int = setting(256, allowed="an integer from 1 to 1024", check=_batch,
                                   doc="the largest decode batch run from a graph; larger batches run eagerly")
    gpu_memory_utilization: float = setting(0.9, allowed="a number in (0, 1]", check=_fraction,
                                            doc="the share of the GPU's memory that weights, activations and the "
                                                "KV pool may take together (the pool gets what is left of it)")
    kv_cache_dtype: str = setting("auto", allowed="auto, fp8, fp8_e4m3 or fp8_e5m2",
                                  check=lambda v: v in KV_CACHE_DTYPES,
                                  doc="what the KV cache stores: auto (the model's dtype) or 8-bit floats, "
                                      "which hold twice the tokens of bf16 (fp8 = fp8_e4m3: 3 mantissa bits, "
                                      "values saturate at ±448, needs compute capability 8.9; fp8_e5m2: 2 "
                                      "mantissa bits, any GPU)")
    async_scheduling: bool = setting(True, allowed="true or false", check=lambda v: isinstance(v, bool),
                                     doc="queue each step of plain decodes' next decode before taking its tokens "
                                         "in, so that the GPU runs while the host appends, detokenizes and "
                                         "streams (false: one step at a time)")

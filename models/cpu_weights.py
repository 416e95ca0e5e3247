"""How a projection's weight is laid out on a CPU, and which matmul kernel a step's rows go through.

A decode step multiplies a few rows by every weight of the model, and on a CPU the kernel torch picks for
``F.linear`` (``x @ W.T`` with W stored [out, in], as checkpoints store it) is far from the best one for
those shapes. Measured on a 2-core AVX-512 VM, fp32, the matmuls of one ``bench-512`` step (8 layers and
the LM head, weights read from memory as in serving; bench/README.md section 12):

| rows | ``F.linear`` as loaded | weight stored transposed | oneDNN, weight prepacked |
|---|---|---|---|
| 1  | 4.3-5.2 ms | 3.6-3.7 ms | 5.2-5.4 ms |
| 4  | 6.5-6.7 ms | 7.0-7.3 ms | 5.9-6.1 ms |
| 16 | 12.9-13.2 ms | 11.1-11.3 ms | 8.8-8.9 ms |
| 64 | 19.8-19.9 ms | 18.6-19.1 ms | 18.2-18.5 ms |

So two layouts, each where it wins:
- **Transposed storage** (the weight's memory holds W.T, the parameter is a transposed view of it, so its
  shape, values and state-dict key are unchanged): ``F.linear`` then multiplies by a contiguous matrix,
  a matrix-vector product that streams the weight once. It costs no memory. Used for one row.
- **A prepacked copy** in oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), for 2 to
  ``PACKED_MAX_ROWS`` rows: batched decode steps and short prefills. Past that (long prompts) the plain
  kernel is as fast or faster (1,280 rows: 11.3 ms plain, 15.5 ms packed), so prefill keeps it. The copy
  costs the weights' memory once more, which is why ``RIVULET_PACKED_WEIGHTS`` can turn it off.

A third way serves one row inside a compiled step (RIVULET_COMPILE): ``row_dots``, the weight kept as it
is loaded ([out, in], each output's weights contiguous), written as a dot product per weight row that
inductor turns into one vectorized reduction split across the cores. On a 2-core AMD EPYC VM (AVX2,
about 20 GB/s for a plain sum) the same 33 products took 8.1-8.3 ms that way against 11.9-13.5 ms through
``F.linear`` on the transposed weight (MKL's matrix-vector product reached 9-10 GB/s there, using one
core's worth of bandwidth), and a whole compiled batch-1 step 9.5 against 11.9 ms. So a compiling runner
keeps the loaded layout, and the transposed one serves eager steps only.

In bf16 the packed kernel (AMX where the CPU has it) is faster even for one row (0.04 ms against 0.11 ms
for a 2816x512 weight), so there it serves every row count up to the cap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows above which the plain kernel serves (a prefill of a long prompt): measured, see above.
PACKED_MAX_ROWS = 256


def packing_available() -> bool:
    """Whether this torch has the oneDNN ops (every x86 and ARM CPU build has; a minimal build may not)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# The packed copy is made only when the weights take at most this share of the free memory: it doubles
# them, and the KV cache is sized from what is left.
PACKED_MAX_SHARE = 0.25


def projection_bytes(model: nn.Module) -> int:
    """Bytes of every projection weight of ``model`` (what a packed copy costs)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def packing_pays(model: nn.Module, free: int | None) -> bool:
    """Whether to make the packed copy of ``model``'s weights: a dtype with a packed kernel, and room for
    it (``free``: bytes free, None when unknown)."""
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)}
    return (packing_available() and dtypes <= set(PACKED_DTYPES)
            and (free is None or projection_bytes(model) <= PACKED_MAX_SHARE * free))


def stored_transposed(weight: torch.Tensor) -> torch.Tensor:
    """The same matrix [out, in], its memory laid out as [in, out]: a transposed view of a contiguous W.T."""
    return weight.detach().t().contiguous().t()


# The dtypes measured with the packed kernel (fp16 on a CPU without AVX-512-FP16 falls back to slow paths).
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of ``weight`` [out, in] in oneDNN's blocked layout, for ``linear``'s batched rows (None where
    this torch or dtype has no such kernel)."""
    if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or not packing_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
    except RuntimeError:  # a dtype this CPU has no kernel for (bf16 without AVX-512 or AVX-NE-CONVERT)
        return None


def uses_packed(rows: int, dtype: torch.dtype) -> bool:
    """Whether ``rows`` rows of ``dtype`` go through the packed copy (when there is one)."""
    smallest = 1 if dtype == torch.bfloat16 else 2
    return smallest <= rows <= PACKED_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T`` through the kernel that is fastest for ``x``'s row count (see the module's docstring)."""
    rows = x.numel() // x.shape[-1]
    if packed is not None and uses_packed(rows, x.dtype):
        if torch.compiler.is_compiling():  # inductor cannot lower the oneDNN op on a packed weight itself
            return packed_linear(x, packed, weight.shape[0])
        return _packed_matmul(x, packed)
    if rows == 1 and weight.is_contiguous() and torch.compiler.is_compiling():
        return row_dots(x, weight)
    return F.linear(x, weight)


def row_dots(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One row ``x`` [..., in] times a weight stored as it is loaded, [out, in]: one dot product per weight
    row, written for the compiler. Inductor makes it a single reduction loop that streams each weight row
    once, vectorized and split across the cores; nothing [out, in]-sized is ever materialized. Only
    compiled steps call it: in eager mode the product would be materialized."""
    return (weight * x.unsqueeze(-2)).sum(-1)


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@torch.library.custom_op("rivulet::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The packed matmul as an opaque op for ``torch.compile`` (RIVULET_COMPILE): compiled code calls it
    as it is, and fuses what lies around it."""
    return _packed_matmul(x, packed)


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)

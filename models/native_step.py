"""The decode step in C (``decode_one`` and ``decode_rows`` in models/native_kernels.c), on a CPU in fp32.

One stream is how most people first try a server, and there a decode step is one pass over every weight
for one row: bound by how fast the weights stream from memory. Through torch that pass is ~200 operators
(eager) or a compiled graph whose matrix-vector products stream at 8-15 GB/s on a 2-core VM; here it is
one call that streams each weight once, four rows at a time with software prefetch, on torch's OpenMP
threads, the GIL released. No compile step and no inductor: a C compiler is all it needs (built with the
other kernels, models/native_build.py), so it serves with ``RIVULET_COMPILE`` off as well as on.

With more rows a step is arithmetic-bound, and torch's kernels reach about half of what the FMA units
do on these shapes, with ~200 small operators around them. ``rows`` runs the whole batched step in one
call too: the rows packed in panels of 16 and multiplied by each weight as it is loaded (each weight read
once a step), norms, rotary, the cache writes and each row's attention over its own keys in between
(bench/README.md section 16). Up to eight rows are not packed: each weight row is read once and
multiplied by every row as the one-row step multiplies it, so two to four rows cost about what one row
does, and each row's logits are the same bits as if it had stepped alone (section 17).

With RIVULET_QUANT=int8 (models/quantize.py) its products read the int8 rows kept beside each weight: one
row's step streams a quarter of the bytes; a batch's widens each tile of int8 rows to floats once, in L1,
and multiplies it as before, so its results are the same bits as over the dequantized fp32 weights.

It reads the model's own tensors where they are (the weights in their loaded layout, which the runner
keeps where this step serves, the KV cache, the rotary tables): nothing is copied, and an in-place change
to a weight is seen by the next step. The tensors are bound once (``NativeStep(model)``), after the runner
has laid them out and set up the cache; they are held here, so nothing this step reads can be freed under
it.
"""
from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from models import native_build
from models.config import LlamaConfig
from models.llama import Llama
from models.quantize import Int8Rows
from models.ragged_attention import MAX_DIM, MAX_GROUP

log = logging.getLogger("rivulet.engine")

_i64, _f32, _float_p = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Matrix(ctypes.Structure):
    _fields_ = [("data", _float_p), ("rows", _i64), ("cols", _i64), ("row_stride", _i64),
                ("quantized", ctypes.c_void_p), ("scales", _float_p)]  # int8 rows and their scales, or NULL


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _float_p), ("post_norm", _float_p), ("qkv", _Matrix), ("o", _Matrix),
                ("gate_up", _Matrix), ("down", _Matrix), ("keys", _float_p), ("values", _float_p)]


class _Model(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("dim", _i64), ("intermediate", _i64),
                ("vocab", _i64), ("layers", _i64), ("positions", _i64), ("rotary_positions", _i64),
                ("eps", _f32), ("embed", _float_p), ("final_norm", _float_p), ("lm_head", _Matrix),
                ("cos", _float_p), ("sin", _float_p), ("layer", ctypes.POINTER(_Layer)), ("cache_rows", _i64)]


def takes(model: Llama) -> bool:
    """Whether the C step serves ``model``: fp32 on a CPU, fused projections, a cache, supported shapes."""
    attention = model.model.layers[0].self_attn
    return (model.lm_head.weight.device.type == "cpu" and model.lm_head.weight.dtype == torch.float32
            and attention.cache is not None and attention.qkv_weight is not None
            and model.model.layers[0].mlp.gate_up_weight is not None and takes_shape(model.config))


def takes_shape(config: LlamaConfig) -> bool:
    """Whether the C step's attention takes ``config``'s heads: whole groups of at most MAX_GROUP query heads
    per key/value head, and an even head size of at most MAX_DIM."""
    return (config.num_attention_heads % config.num_key_value_heads == 0
            and config.num_attention_heads // config.num_key_value_heads <= MAX_GROUP
            and config.head_dim <= MAX_DIM and config.head_dim % 2 == 0)


def will_serve(config: LlamaConfig, device: torch.device, dtype: torch.dtype, native_kernels: bool) -> bool:
    """Whether a runner (models/runner.py) will run the native step for a model of ``config`` loaded on
    ``device`` in ``dtype`` with RIVULET_NATIVE_KERNELS=``native_kernels``: asked before the model is laid
    out, by the backend planning its memory and by the runner itself."""
    return (native_kernels and device.type == "cpu" and dtype == torch.float32 and takes_shape(config)
            and native_build.load() is not None)


class NativeStep:
    def __init__(self, model: Llama, library: ctypes.CDLL) -> None:
        """Bind ``model``'s tensors (laid out, fused, with its cache set up: ``takes(model)``)."""
        if not takes(model):
            raise ValueError("the native step does not take this model")
        self._decode = library.decode_one
        self._decode.restype = ctypes.c_int
        self._decode.argtypes = [ctypes.POINTER(_Model), _i64, _i64, _float_p, _float_p, ctypes.c_int]
        self._decode_rows = library.decode_rows
        self._decode_rows.restype = ctypes.c_int
        self._decode_rows.argtypes = [ctypes.POINTER(_Model), _float_p, _float_p, _i64, _float_p, _float_p,
                                      ctypes.c_int]
        scratch_size = library.decode_one_scratch
        scratch_size.restype = _i64
        scratch_size.argtypes = [ctypes.POINTER(_Model)]
        rows_scratch_size = library.decode_rows_scratch
        rows_scratch_size.restype = _i64
        rows_scratch_size.argtypes = [ctypes.POINTER(_Model), _i64]
        config = model.config
        self._held: list[torch.Tensor] = []  # every tensor the C step reads: kept alive as long as it is
        layers = (_Layer * config.num_hidden_layers)()
        for layer, decoder in zip(layers, model.model.layers):
            attention, mlp, cache = decoder.self_attn, decoder.mlp, decoder.self_attn.cache
            layer.input_norm = self._vector(decoder.input_layernorm.weight)
            layer.post_norm = self._vector(decoder.post_attention_layernorm.weight)
            heads_dim = config.num_attention_heads * config.head_dim
            qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
            layer.qkv = self._matrix(attention.qkv_weight, (qkv_rows, config.hidden_size), attention.qkv_int8)
            layer.o = self._matrix(attention.o_proj.weight, (config.hidden_size, heads_dim), attention.o_proj.int8)
            layer.gate_up = self._matrix(mlp.gate_up_weight, (2 * config.intermediate_size, config.hidden_size),
                                         mlp.gate_up_int8)
            layer.down = self._matrix(mlp.down_proj.weight, (config.hidden_size, config.intermediate_size),
                                      mlp.down_proj.int8)
            layer.keys, layer.values = self._cache(cache.k), self._cache(cache.v)
        self._layers = layers
        rotary = model.rotary
        cache_rows, _, positions, _ = model.model.layers[0].self_attn.cache.k.shape
        self._model = _Model(
            hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
            dim=config.head_dim, intermediate=config.intermediate_size, vocab=config.vocab_size,
            layers=config.num_hidden_layers, positions=positions, rotary_positions=rotary.cos.shape[0],
            eps=config.rms_norm_eps, embed=self._rows(model.model.embed_tokens.weight),
            final_norm=self._vector(model.model.norm.weight),
            lm_head=self._matrix(model.lm_head.weight, (config.vocab_size, config.hidden_size), model.lm_head.int8),
            cos=self._rows(rotary.cos), sin=self._rows(rotary.sin), layer=layers, cache_rows=cache_rows)
        self._pointer = ctypes.pointer(self._model)
        self.vocab = config.vocab_size
        self.positions = min(positions, rotary.cos.shape[0])
        self._scratch = torch.empty(scratch_size(self._pointer), dtype=torch.float32)
        self.quantized = model.lm_head.int8 is not None  # RIVULET_QUANT=int8: the products read int8 rows
        self.max_rows = cache_rows
        self._rows_scratch = torch.empty(rows_scratch_size(self._pointer, cache_rows), dtype=torch.float32)
        self.steps = 0  # one-row steps served (tests, logs)
        self.batched_steps = 0

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Cache row 0's next step: ``token`` at ``position``. -> logits [1, V]"""
        logits = torch.empty(1, self.vocab, dtype=torch.float32)
        status = self._decode(self._pointer, token, position, logits.data_ptr(), self._scratch.data_ptr(),
                              torch.get_num_threads())
        if status != 0:
            raise ValueError(f"native decode step: token {token} or position {position} out of range")
        self.steps += 1
        return logits

    def serves_rows(self, positions: list[int]) -> bool:
        return 0 < len(positions) <= self.max_rows and all(0 <= p < self.positions for p in positions)

    def rows(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Cache rows 0..B-1's next step: row r's ``tokens[r]`` at ``positions[r]``. -> logits [B, V]"""
        batch = len(tokens)
        if len(positions) != batch:
            raise ValueError(f"native decode step: {batch} tokens for {len(positions)} positions")
        token_ids = torch.tensor(tokens, dtype=torch.long)
        position_ids = torch.tensor(positions, dtype=torch.long)
        logits = torch.empty(batch, self.vocab, dtype=torch.float32)
        status = self._decode_rows(self._pointer, token_ids.data_ptr(), position_ids.data_ptr(), batch,
                                   logits.data_ptr(), self._rows_scratch.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise ValueError(f"native decode step: {batch} rows, a token or position out of range")
        self.batched_steps += 1
        return logits

    def _hold(self, tensor: torch.Tensor) -> int:
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(f"native decode step: a {tensor.dtype} tensor on {tensor.device}")
        self._held.append(tensor)
        return tensor.data_ptr()

    def _vector(self, tensor: torch.Tensor) -> int:
        if not tensor.is_contiguous():
            raise ValueError("native decode step: a vector with gaps")
        return self._hold(tensor.detach())

    def _rows(self, tensor: torch.Tensor) -> int:
        """A table read a whole row at a time: contiguous rows."""
        if tensor.stride() != (tensor.shape[1], 1):
            raise ValueError("native decode step: a table whose rows are not contiguous")
        return self._hold(tensor.detach())

    def _matrix(self, weight: torch.Tensor, shape: tuple[int, int], int8: Int8Rows | None = None) -> _Matrix:
        """A weight [out, in] of ``shape`` (the C step sizes its buffers by the config) in its loaded layout,
        each row contiguous: what the runner lays out where this step serves (models/cpu_weights.py). With
        ``int8`` (RIVULET_QUANT=int8) the products read its rows (contiguous) and never the weight."""
        if int8 is not None:  # the fp32 weight is not read, and may have been released (keep_only_int8)
            matrix = _int8_matrix(int8, shape)
            self._held += [int8.values, int8.scales]
            return matrix
        rows, cols = weight.shape
        if (rows, cols) != shape:
            raise ValueError(f"native decode step: a weight of shape {(rows, cols)} where {shape} was expected")
        if weight.stride(1) != 1:
            raise ValueError(f"native decode step: a weight whose rows are not contiguous (strides {weight.stride()})")
        return _Matrix(self._hold(weight.detach()), rows, cols, weight.stride(0))

    def _cache(self, cache: torch.Tensor) -> int:
        """A layer's cache [rows, KV, positions, D], contiguous."""
        if not cache.is_contiguous():
            raise ValueError("native decode step: a KV cache with gaps")
        return self._hold(cache)


def _int8_matrix(int8: Int8Rows, shape: tuple[int, ...]) -> _Matrix:
    """int8 rows of ``shape`` as the C products' Matrix, with no fp32 data."""
    values, scales = int8.values, int8.scales
    rows, cols = shape
    if (tuple(values.shape) != tuple(shape) or values.dtype != torch.int8 or not values.is_contiguous()
            or tuple(scales.shape) != (rows,) or scales.dtype != torch.float32 or not scales.is_contiguous()
            or values.device.type != "cpu" or scales.device.type != "cpu"):
        raise ValueError(f"native decode step: int8 rows of shape {tuple(values.shape)} where {tuple(shape)} "
                         "(contiguous, on the CPU) was expected")
    return _Matrix(None, rows, cols, cols, values.data_ptr(), scales.data_ptr())


class Int8Product:
    """``x @ W.T`` for a weight kept only as int8 rows: the native step's own product (``multiply_rows_by``:
    a few rows unpacked, more in packed panels), for prefill and the steps torch runs where the fp32 weight
    has been released (``keep_only_int8``). Any number of rows; the GIL is released while it runs."""

    def __init__(self, int8: Int8Rows, library: ctypes.CDLL) -> None:
        self._multiply = library.multiply_rows_by
        self._multiply.restype = ctypes.c_int
        self._multiply.argtypes = [ctypes.POINTER(_Matrix), _float_p, _i64, _float_p, _float_p, ctypes.c_int]
        self._scratch = library.multiply_rows_scratch
        self._scratch.restype = _i64
        self._scratch.argtypes = [_i64, _i64]
        self.int8 = int8  # held: the product reads its memory
        self.out_features, self.in_features = int8.values.shape
        self._bind()  # here, so rows the C products cannot read are refused at load

    def _addresses(self) -> tuple[int, int]:
        return self.int8.values.data_ptr(), self.int8.scales.data_ptr()

    def _bind(self) -> None:
        self._matrix = _int8_matrix(self.int8, (self.out_features, self.in_features))
        self._bound_to = self._addresses()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.in_features:
            raise ValueError(f"int8 product: {self.in_features} fp32 inputs on the CPU expected, not {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        if self._addresses() != self._bound_to:  # the rows moved (into 2 MiB pages: models/huge_pages.py)
            self._bind()
        flat = x.reshape(-1, self.in_features).contiguous()
        rows = flat.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        if rows > 0:
            packed = torch.empty(self._scratch(rows, self.in_features), dtype=torch.float32)
            status = self._multiply(ctypes.byref(self._matrix), flat.data_ptr(), rows, y.data_ptr(),
                                    packed.data_ptr(), torch.get_num_threads())
            if status != 0:
                raise ValueError(f"int8 product: {rows} rows refused")
        return y.view(*x.shape[:-1], self.out_features)


def _released() -> nn.Parameter:
    """What a released weight becomes: no memory, and still fp32 on the CPU for those that ask its dtype."""
    return nn.Parameter(torch.empty(0), requires_grad=False)


@torch.no_grad()
def keep_only_int8(model: Llama, library: ctypes.CDLL) -> int:
    """Where the native step serves a model quantized by ``quantize_model``: every product goes through the
    int8 rows (``Int8Product`` for prefill and torch's steps, the native step's own), and the fp32 projection
    weights and packed copies are released. A head tied to the embeddings keeps its fp32 matrix, which the
    embedding reads. The values are those the fp32 copy held, and the products the native step's own, so
    the outputs are unchanged. -> bytes released"""
    released = 0

    def release(*tensors: torch.Tensor | None) -> None:
        nonlocal released
        released += sum(t.numel() * t.element_size() for t in tensors if t is not None)

    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.qkv_product = Int8Product(attention.qkv_int8, library)
        release(attention.qkv_weight, attention.qkv_packed)
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
            linear.weight = _released()
        attention.qkv_weight, attention.qkv_packed = torch.empty(0), None
        mlp.gate_up_product = Int8Product(mlp.gate_up_int8, library)
        release(mlp.gate_up_weight, mlp.gate_up_packed)
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight = _released()
        mlp.gate_up_weight, mlp.gate_up_packed = torch.empty(0), None
        for linear in (attention.o_proj, mlp.down_proj):
            linear.int8_product = Int8Product(linear.int8, library)
            release(linear.weight, linear.packed)
            linear.weight, linear.packed = _released(), None
    head = model.lm_head
    head.int8_product = Int8Product(head.int8, library)
    release(head.packed)
    head.packed = None
    if not model.config.tie_word_embeddings:
        release(head.weight)
        head.weight = _released()
    return released


def bind(model: Llama) -> NativeStep | None:
    """The native step for ``model`` where the kernels load and it takes the model; else None (logged)."""
    if not takes(model):
        return None
    library = native_build.load()
    if library is None:
        return None
    try:
        return NativeStep(model, library)
    except ValueError as exc:  # a tensor laid out as the C step cannot read: torch serves the step
        log.warning("the native one-row step does not take this model, torch runs it: %s", exc)
        return None

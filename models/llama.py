"""A Llama-family transformer in plain torch, with a preallocated KV cache.

Only ``nn.Module``s live here: no files, threads or HTTP. Parameter names match HF's
``LlamaForCausalLM`` so a checkpoint's state dict loads as it is.

The ways through the model:
- ``forward(tokens)``: causal attention over the tokens alone, no cache (training, tests).
- ``prefill(tokens, rows, lengths)``: several prompts at once, right-padded to one length; fills
  cache rows ``rows`` from position 0. Causal attention keeps padding out of every real position, and
  the padding's cached keys lie past each row's length, where decode masks them (and overwrites them).
- ``decode(tokens, positions)``: one new token for each of the first B cache rows, each at its own
  position; rows are kept compact (0..B-1) by the runner so attention reads a view, never a copy. A
  few much longer rows may attend on their own (``alone``, planned by models/attention_plan.py). On a
  CPU with ``use_native_attention()``, batched steps attend instead through a kernel that reads each
  row's own keys only (models/ragged_attention.py): no mask, no lone rows.
- ``prefill_chunk`` / ``decode_with_chunk``: the next piece of one long prompt, alone or in the same
  pass as a decode step (one read of the weights for both).
- ``decode_static(tokens, positions, write_positions, keys)``: ``decode`` with every shape fixed by the
  caller and nothing read back to the host, for a step replayed from a CUDA graph (models/cuda_graphs.py).

``fuse_projections()`` (the runner calls it once at load) lays q/k/v and gate/up weights out as one
matrix each, the separate parameters becoming views of it: one matmul where there were three (two),
rotary embedding applied to queries and keys in one pass, no extra memory, and state dicts unchanged.
On a CPU a batch-1 step is many small ops, and each one's dispatch costs as much as its arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_weights, ragged_attention
from models.config import LlamaConfig


class Linear(nn.Linear):
    """``nn.Linear`` that leaves its weight uninitialised: a checkpoint or ``Llama.init_weights`` fills
    it. Loading then needs neither a throw-away random init nor the meta device (whose first use
    imports torch's decomposition tables: seconds at every start-up).

    ``packed``: on a CPU, a copy of the weight for the rows that multiply faster through it
    (models/cpu_weights.py); None elsewhere. ``int8``: the weight's int8 rows where RIVULET_QUANT=int8
    (models/quantize.py), read by the native decode step; None elsewhere. ``int8_product``: where the
    native step serves an int8 model, the weight is released and every product reads the int8 rows
    (``native_step.keep_only_int8``)."""

    packed: torch.Tensor | None = None
    int8 = None  # models.quantize.Int8Rows | None
    int8_product = None  # models.native_step.Int8Product where only the int8 rows are kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_product is not None:
            return self.int8_product(x)
        return cpu_weights.linear(x, self.weight, self.packed)

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """``nn.Embedding`` without its own initialisation, for the same reason as ``Linear``."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, then cast back: bf16 variance loses too much.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryTable(nn.Module):
    """cos/sin for every position, HF's "rotate half" convention (not interleaved pairs)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("positions", torch.arange(max_positions), persistent=False)  # 0..S-1, reused

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> [B, 1, T, D], broadcast over heads
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row over its row's keys, each key/value head serving its group of query heads, with an
    additive ``mask``: q [B, H, 1, D], k, v [B, KV, L, D], mask [B, 1, 1, L]. -> [B, H, 1, D]

    What ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` computes, without
    depending on the kernel torch picks for it on CUDA: the flash kernel takes no mask, the memory-efficient
    one takes no grouped heads in the torch sources read for this (later versions may), and the math kernel
    left copies every key and value once per query head of its group (``repeat_interleave``). Here the
    queries are grouped instead, HF's convention (key/value head j serves query heads j*G..(j+1)*G-1), so
    the keys and values are read where they lie. Scores and softmax in fp32, as HF's eager attention."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # [B, KV, G, D]
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * head_dim ** -0.5  # [B, KV, G, L]
    weights = torch.softmax(scores + mask, dim=-1).to(v.dtype)  # the mask broadcasts over heads
    return torch.matmul(weights, v).reshape(batch, heads, 1, head_dim)


def per_row(x: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` tokens of one sequence [1, H, T, D] as one token per row: [rows, H, 1, D]."""
    return x[0, :, :rows].transpose(0, 1).unsqueeze(2)


def fuse_weights(*linears: nn.Linear, transposed: bool = False) -> torch.Tensor:
    """The linears' weights stacked into one [sum(out), in] matrix; each linear's weight becomes a view
    of its rows, so the memory is not doubled and the state dict still has every key. ``transposed``:
    the matrix's memory holds its transpose (models/cpu_weights.py)."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    if transposed:
        fused = cpu_weights.stored_transposed(fused)
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    return fused


def lay_out_linear(linear: Linear, pack: bool, transposed: bool = True) -> None:
    """``linear``'s weight stored transposed (unless ``transposed`` is False) and, with ``pack``, packed
    (models/cpu_weights.py)."""
    if transposed:
        linear.weight = nn.Parameter(cpu_weights.stored_transposed(linear.weight), requires_grad=False)
    linear.packed = cpu_weights.pack(linear.weight) if pack else None


class KVCache(nn.Module):
    """One layer's keys and values for ``max_batch`` sequences of up to ``max_seq`` tokens."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)  # [B, H, S, D]
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Each (row, head)'s first flat slot, so a step's slots are one add.
        base = torch.arange(max_batch * n_kv_heads, device=device).view(max_batch, n_kv_heads) * max_seq
        self.register_buffer("slot_base", base, persistent=False)  # [B, H]

    def write_prompt(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [N, H, T, D] -> cache rows `rows` [N], positions 0..T-1
        length = k.shape[2]
        self.k[rows, :, :length] = k
        self.v[rows, :, :length] = v

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat indices (into ``k.view(-1, D)``) of each row's ``positions[b]``, every head. -> [B*H]"""
        return (self.slot_base[:positions.shape[0]] + positions.unsqueeze(1)).flatten()

    def write_step(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [B, H, 1, D] -> the slots of each row's own position. index_copy_ of whole D-vectors:
        # advanced indexing (k[rows, :, positions] = ...) is several times slower here.
        head_dim = k.shape[-1]
        self.k.view(-1, head_dim).index_copy_(0, slots, k.reshape(-1, head_dim))
        self.v.view(-1, head_dim).index_copy_(0, slots, v.reshape(-1, head_dim))

    def write_chunk(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [1, H, C, D] -> row ``row``, positions start..start+C-1. -> the row's keys and values so
        far, [1, H, start+C, D]"""
        end = start + k.shape[2]
        self.k[row, :, start:end] = k[0]
        self.v[row, :, start:end] = v[0]
        return self.k[row:row + 1, :, :end], self.v[row:row + 1, :, :end]

    def view(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:batch, :, :length], self.v[:batch, :, :length]  # [B, H, L, D]

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.cache: KVCache | None = None
        # A non-persistent buffer (never in the state dict), so that an exported step can name it
        # (models/exported_decode.py). Set by fuse().
        self.register_buffer("qkv_weight", None, persistent=False)
        # oneDNN's opaque layout, which export cannot trace: an attribute, left out of exported steps.
        self.qkv_packed: torch.Tensor | None = None  # set by lay_out_for_cpu()
        self.qkv_int8 = None  # models.quantize.Int8Rows of qkv_weight, set by quantize_model()
        self.qkv_product = None  # its native product where only the int8 rows are kept (native_step.keep_only_int8)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.qkv_weight is None:
            self.qkv_weight = fuse_weights(self.q_proj, self.k_proj, self.v_proj)

    @torch.no_grad()
    def lay_out_for_cpu(self, pack: bool, transposed: bool = True) -> None:
        self.qkv_weight = fuse_weights(self.q_proj, self.k_proj, self.v_proj, transposed=transposed)
        self.qkv_packed = cpu_weights.pack(self.qkv_weight) if pack else None
        lay_out_linear(self.o_proj, pack, transposed)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys (rotated) and values of ``x`` [B, T, hidden]. -> [B, H|KV, T, D] each"""
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_weight is None and self.qkv_product is None:
            q = self.q_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, T, D]
            k = self.k_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # [B, KV, T, D]
            v = self.v_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
        qkv = (self.qkv_product(x) if self.qkv_product is not None
               else cpu_weights.linear(x, self.qkv_weight, self.qkv_packed))
        qkv = qkv.view(batch, length, heads + 2 * kv_heads, head_dim)
        qk = apply_rotary(qkv[:, :, :heads + kv_heads].transpose(1, 2), cos, sin)  # [B, H+KV, T, D]
        return qk[:, :heads], qk[:, heads:], qkv[:, :, heads + kv_heads:].transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str,
                rows: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, keys: int | None = None,
                row: int | None = None, start: int = 0, chunk_mask: torch.Tensor | None = None,
                alone: tuple[tuple[int, int], ...] = (), lengths: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if mode == "decode":
            out = self._decode_attention(q, k, v, slots, mask, keys, alone, lengths)
        elif mode == "static":
            assert self.cache is not None and slots is not None and mask is not None and keys is not None
            self.cache.write_step(slots, k, v)
            out = grouped_attention(q, *self.cache.view(batch, keys), mask)
        elif mode == "chunk":
            out = self._chunk_attention(q, k, v, row, start, mask)
        elif mode == "mixed":
            # One sequence of B decode tokens (one per cache row 0..B-1) then C tokens of a long prompt's
            # chunk: the projections and the MLP run once over all of them (the weights are read once a
            # step), attention runs for each part on its own.
            assert slots is not None
            rows_decoding = slots.shape[0] // self.n_kv_heads
            decoded = self._decode_attention(*(per_row(t, rows_decoding) for t in (q, k, v)),
                                             slots, mask, keys, alone, lengths)  # [B, H, 1, D]
            chunked = self._chunk_attention(q[:, :, rows_decoding:], k[:, :, rows_decoding:], v[:, :, rows_decoding:],
                                            row, start, chunk_mask)  # [1, H, C, D]
            out = torch.cat([decoded.squeeze(2).transpose(0, 1).unsqueeze(0), chunked], dim=2)  # [1, H, B+C, D]
        else:
            if mode == "prefill":
                assert self.cache is not None and rows is not None
                self.cache.write_prompt(rows, k, v)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)  # [B, T, H*D]
        return self.o_proj(out)

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None,
                          mask: torch.Tensor | None, keys: int | None, alone: tuple[tuple[int, int], ...] = (),
                          lengths: torch.Tensor | None = None) -> torch.Tensor:
        """One new token for each of cache rows 0..B-1: q, k, v [B, H|KV, 1, D]. -> [B, H, 1, D]

        With ``lengths`` [B], row b attends over its first ``lengths[b]`` keys through the native kernel
        (models/ragged_attention.py). Otherwise rows in ``alone`` (row, length) attend over exactly their own
        keys, and the shared attention's result for them (over ``keys`` keys only) is replaced."""
        assert self.cache is not None and slots is not None and keys is not None
        self.cache.write_step(slots, k, v)
        if lengths is not None:
            return ragged_attention.attend(q, self.cache.k, self.cache.v, lengths)
        gqa = self.n_kv_heads != self.n_heads
        k, v = self.cache.view(q.shape[0], keys)  # [B, KV, L, D]
        # No mask when every row sees all L keys (batch 1, or rows of one length).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        for row, length in alone:
            out[row:row + 1] = F.scaled_dot_product_attention(
                q[row:row + 1], self.cache.k[row:row + 1, :, :length], self.cache.v[row:row + 1, :, :length],
                enable_gqa=gqa)
        return out

    def _chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int | None, start: int,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """A piece of a long prompt, q, k, v [1, H|KV, C, D]: its keys join the row's earlier ones, and query i
        (at position start + i) sees every key up to its own position. -> [1, H, C, D]"""
        assert self.cache is not None and row is not None and mask is not None
        k, v = self.cache.write_chunk(row, start, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by fuse(), as Attention's
        self.gate_up_packed: torch.Tensor | None = None  # set by lay_out_for_cpu()
        self.gate_up_int8 = None  # models.quantize.Int8Rows of gate_up_weight, set by quantize_model()
        self.gate_up_product = None  # as Attention's qkv_product

    @torch.no_grad()
    def fuse(self) -> None:
        if self.gate_up_weight is None:
            self.gate_up_weight = fuse_weights(self.gate_proj, self.up_proj)

    @torch.no_grad()
    def lay_out_for_cpu(self, pack: bool, transposed: bool = True) -> None:
        self.gate_up_weight = fuse_weights(self.gate_proj, self.up_proj, transposed=transposed)
        self.gate_up_packed = cpu_weights.pack(self.gate_up_weight) if pack else None
        lay_out_linear(self.down_proj, pack, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None and self.gate_up_product is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = (self.gate_up_product(x) if self.gate_up_product is not None
                   else cpu_weights.linear(x, self.gate_up_weight, self.gate_up_packed))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryTable(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.native_attention = False  # batched decode steps through models/ragged_attention.py
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> "Llama":
        """HF's initialisation (normal, ``initializer_range`` 0.02) for training or random checkpoints."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
        return self

    def fuse_projections(self) -> None:
        """Inference only (the fused weights take no gradients): see the module's docstring."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def lay_out_for_cpu(self, pack: bool, transposed: bool = True) -> None:
        """Inference on a CPU: every projection weight stored transposed (unless ``transposed`` is False) and,
        with ``pack``, a prepacked copy beside it, each serving the row counts it multiplies fastest
        (models/cpu_weights.py). Fuses the projections first. Values, shapes and state-dict keys stay as
        they were."""
        for layer in self.model.layers:
            layer.self_attn.lay_out_for_cpu(pack, transposed)
            layer.mlp.lay_out_for_cpu(pack, transposed)
        # A head tied to the embeddings keeps its layout: the embedding reads rows of the same matrix.
        lay_out_linear(self.lm_head, pack, transposed=transposed and not self.config.tie_word_embeddings)

    def setup_cache(self, max_batch: int, max_seq: int | None = None) -> None:
        max_seq = max_seq or self.config.max_position_embeddings
        param = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(max_batch, self.config.num_key_value_heads, max_seq,
                                            self.config.head_dim, param.dtype, param.device)

    def _run(self, tokens: torch.Tensor, token_positions: torch.Tensor, **attn) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)  # [B, T, hidden]
        cos, sin = self.rotary(token_positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, **attn)
        return self.model.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for every position of ``tokens`` [B, T], no cache. -> [B, T, V]"""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return self.lm_head(self._run(tokens, positions, mode="full"))

    def prefill(self, tokens: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Fill cache rows ``rows`` [N] with the prompts ``tokens`` [N, T], right-padded; each is
        ``lengths[n]`` long. -> each prompt's last-position logits [N, V]"""
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(batch, -1)
        hidden = self._run(tokens, positions, mode="prefill", rows=rows)  # [N, T, hidden]
        last = hidden[torch.arange(batch, device=tokens.device), lengths - 1]  # [N, hidden]
        return self.lm_head(last)

    def prefill_chunk(self, tokens: torch.Tensor, row: int, start: int) -> torch.Tensor:
        """Cache ``tokens`` [C], positions start..start+C-1 of one prompt, in cache row ``row`` whose
        positions 0..start-1 hold the prompt's earlier chunks. -> the last position's logits [V]

        A long prompt prefilled in chunks, one per engine step, keeps the running streams decoding between
        them instead of waiting for the whole prompt (models/scheduler.py)."""
        positions = torch.arange(start, start + tokens.shape[0], device=tokens.device)
        hidden = self._run(tokens.unsqueeze(0), positions.unsqueeze(0), mode="chunk", row=row, start=start,
                           mask=self._chunk_mask(positions, start + tokens.shape[0]))
        return self.lm_head(hidden[0, -1])

    def _chunk_mask(self, positions: torch.Tensor, end: int) -> torch.Tensor:
        """Query i of a chunk (at ``positions[i]``, the last at ``end - 1``) sees every key up to its own
        position. -> [1, 1, C, end]"""
        keys = self.rotary.positions[:end]
        mask = torch.where(keys.unsqueeze(0) > positions.unsqueeze(1), float("-inf"), 0.0)  # [C, end]
        return mask.to(self.lm_head.weight.dtype)[None, None]

    def _decode_mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Row b sees its own positions 0..positions[b]; longer rows' keys are masked out. -> [B, 1, 1, L]
        An additive mask built once per step: SDPA would otherwise convert a boolean one in every layer."""
        keys = self.rotary.positions[:length]
        mask = torch.where(keys.unsqueeze(0) > positions.unsqueeze(1), float("-inf"), 0.0)  # [B, L]
        return mask.to(self.lm_head.weight.dtype)[:, None, None, :]

    def use_native_attention(self) -> bool:
        """Batched decode steps attend through the native kernel (models/ragged_attention.py) where it
        builds and takes this model. -> whether it does"""
        attention = self.model.layers[0].self_attn
        param = self.lm_head.weight
        self.native_attention = (ragged_attention.RaggedAttention.takes(
            attention.n_heads, attention.n_kv_heads, attention.head_dim, param.dtype, param.device)
            and ragged_attention.load() is not None)
        return self.native_attention

    def _native_lengths(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Each row's key count for the native kernel (its position + 1), or None where SDPA attends: no
        kernel, or one row (no mask to save, and the batch-1 step compiled ahead of time uses SDPA)."""
        return positions + 1 if self.native_attention and positions.shape[0] > 1 else None

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int | None = None,
               ragged: bool = True, alone: tuple[tuple[int, int], ...] = ()) -> torch.Tensor:
        """One step for cache rows 0..B-1: ``tokens`` [B] at ``positions`` [B]. -> logits [B, V]

        ``length`` (max position + 1) saves a device sync when the caller already knows it; ``ragged``
        False says every row is at the same position (batch 1 always is), so attention needs no mask.
        ``alone``: (row, length) of rows that attend on their own over their ``length`` keys, the others
        sharing one attention over ``length`` keys (models/attention_plan.py).
        """
        if length is None:
            length = int(positions.max()) + 1
        lengths = self._native_lengths(positions)
        mask = self._decode_mask(positions, length) if ragged and lengths is None else None
        slots = self.model.layers[0].self_attn.cache.slots(positions)  # the same in every layer
        hidden = self._run(tokens.unsqueeze(1), positions.unsqueeze(1), mode="decode", slots=slots, mask=mask,
                           keys=length, alone=alone if lengths is None else (), lengths=lengths)
        return self.lm_head(hidden[:, 0])

    def decode_static(self, tokens: torch.Tensor, positions: torch.Tensor, write_positions: torch.Tensor,
                      keys: int) -> torch.Tensor:
        """One step for cache rows 0..N-1 whose shapes depend on N and ``keys`` only, and which reads nothing
        back to the host: what a CUDA graph can capture (models/cuda_graphs.py). -> logits [N, V]

        ``tokens`` [N] at ``positions`` [N]; row b's new key and value go to position ``write_positions[b]``
        of its cache row (a padding row's go to a spare position no row ever reads). Every row attends over
        ``keys`` keys with a mask, grouped (``grouped_attention``): exact for every row, so no row needs
        to attend alone, and no key or value is copied."""
        mask = self._decode_mask(positions, keys)
        slots = self.model.layers[0].self_attn.cache.slots(write_positions)  # the same in every layer
        hidden = self._run(tokens.unsqueeze(1), positions.unsqueeze(1), mode="static", slots=slots, mask=mask,
                           keys=keys)
        return self.lm_head(hidden[:, 0])

    def decode_with_chunk(self, tokens: torch.Tensor, positions: torch.Tensor, length: int, ragged: bool,
                          chunk: torch.Tensor, row: int, start: int, alone: tuple[tuple[int, int], ...] = ()
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode`` for cache rows 0..B-1 and ``prefill_chunk`` of ``chunk`` [C] into row ``row`` (past
        B) in one pass: the weights are read once for both, so the chunk costs its tokens' arithmetic
        and attention, not another pass over the weights. -> (decode logits [B, V], the chunk's last
        position's logits [V])"""
        batch, size = tokens.shape[0], chunk.shape[0]
        chunk_positions = torch.arange(start, start + size, device=tokens.device)
        slots = self.model.layers[0].self_attn.cache.slots(positions)
        lengths = self._native_lengths(positions)
        hidden = self._run(torch.cat([tokens, chunk]).unsqueeze(0),
                           torch.cat([positions, chunk_positions]).unsqueeze(0), mode="mixed", slots=slots,
                           mask=self._decode_mask(positions, length) if ragged and lengths is None else None,
                           keys=length, alone=alone if lengths is None else (), lengths=lengths,
                           row=row, start=start, chunk_mask=self._chunk_mask(chunk_positions, start + size))
        # hidden [1, B+C, hidden]
        logits = self.lm_head(torch.cat([hidden[0, :batch], hidden[0, -1:]]))  # [B+1, V]
        return logits[:batch], logits[batch]

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of row ``src`` into row ``dst`` in every layer."""
        for layer in self.model.layers:
            layer.self_attn.cache.move_row(src, dst, length)

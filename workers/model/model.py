"""A compact Llama-family transformer (Llama, Mistral, Qwen2, SmolLM2), gpt-fast style.

One sequence per `forward`, token ids in, logits out, over a static KV cache;
`forward_batch` runs several sequences (ragged segments, each over its own
cache) in one pass. Shapes in comments:
T = new tokens in this pass, L = attended length (cache.length + T),
H = query heads, KV = key/value heads, G = H // KV, D = head_dim.

Weights are fused at load time: q/k/v into one `wqkv`, gate/up into one `w13`.
Layers expose `attention_block` and `mlp_block` (residual contributions) so a
caller can run chosen layers on chosen inputs (EasySpec); `forward` is built
from `embed`, those blocks and `head`.

A tensor-parallel rank's model (`split`, see tensor_split.py) holds only its
share of every layer: its KV heads (with their query heads) and a slice of the
MLP's intermediate features; its KV cache holds those heads only.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import attend, elementwise
from .args import ModelArgs
from .cache import KVCache
from .layers import DecodeLayers
from .tensor_split import TensorSplit


# Passes of up to this many new tokens (decode steps and verifications) attend row by row,
# each row as a 1-token pass would (batch invariance); longer ones (prefills) use one masked
# pass on the layer-by-layer path.
ROW_WISE_MAX_T = 8

# Where DecodeLayers runs a model (float32 on the CPU), a segment of more rows (a prefill chunk)
# takes it too while it ends at or before this position, and the layer-by-layer path beyond.
# Its attention is the row-wise kernel's, which re-reads the keys for every row where the
# masked pass (scaled_dot_product_attention) tiles them: measured, SmolLM2-135M float32, 2
# threads, same process alternated, layer by layer -> one call: a 48-row chunk 96.6 -> 84.0
# ms, 512 rows from position 0 945.9 -> 948.3, 512 rows from 1,024 1,361 -> 1,688; a step of
# 16 decode rows and a 40-row chunk 154.6 -> 107.5 (the layer-by-layer path splits every
# linear call at the chunk). By position, not by batch: a chunk's path (and its bits) must
# not depend on what else a step runs.
FUSED_PREFILL_END = 1024


class Positions(NamedTuple):
    """Where a pass of T new tokens sits: built once per pass by LlamaModel.positions."""

    start: int  # position of the first new token (= cache length before the pass)
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D], first half negated (see rope_tables)
    mask: torch.Tensor | None  # [G*T, start+T] bool, True = attend; None when T <= ROW_WISE_MAX_T


# A batched pass (forward_batch) computes each linear over the rows of many segments at once, in
# calls of at most this many rows, when the linear is batch-invariant up to it (probed once).
MAX_BATCH_ROWS = 64
INVARIANCE_PROBE_ROWS = (2, 3, 5, 8, 9, 16, 17, 31, 32, 33, 48, MAX_BATCH_ROWS)


class Segment(NamedTuple):
    """One sequence's part of a batched pass (LlamaModel.forward_batch): T new tokens at
    positions cache.length.., over that sequence's own cache."""

    tokens: torch.Tensor  # [T] token ids
    cache: KVCache
    num_logits: int = 1  # logits of the last num_logits tokens (0: only fill the cache)


def row_spans(lengths: Sequence[int], batchable: Sequence[bool], max_rows: int = MAX_BATCH_ROWS) -> list[tuple[int, int]]:
    """Row ranges [a, b) of segments laid one after another, one linear call each: consecutive
    batchable segments share a call of at most max_rows rows (a segment is never split);
    every other segment gets a call of its own, the shape it has alone. Empty segments get none."""
    spans: list[tuple[int, int]] = []
    start, last_batchable = 0, False
    for length, ok in zip(lengths, batchable):
        end = start + length
        if length and ok and last_batchable and end - spans[-1][0] <= max_rows:
            spans[-1] = (spans[-1][0], end)
        elif length:
            spans.append((start, end))
            last_batchable = ok
        start = end
    return spans


def segment_bounds(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges [a, b) of segments of these lengths laid one after another."""
    ends = list(itertools.accumulate(lengths))
    return [(end - n, end) for n, end in zip(lengths, ends)]


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class RaggedRows:
    """The rows of a batched pass: where each segment's rows are, their RoPE rows, and how
    each linear takes them (all rows at once where it is batch-invariant, else each
    segment's rows alone, so that every segment gets bit for bit what it gets alone)."""

    def __init__(self, lengths: Sequence[int], positions: Sequence["Positions"], min_rows: Callable[[nn.Module], int | None]):
        self.lengths = list(lengths)
        self.bounds = segment_bounds(lengths)  # rows of each segment
        # every segment a decode step or a verification: attention in one kernel call a layer
        self.short = all(n <= ROW_WISE_MAX_T for n in lengths)
        self.starts_i32 = torch.tensor([p.start for p in positions], dtype=torch.int32)
        self.lengths_i32 = torch.tensor(self.lengths, dtype=torch.int32)
        self._one_call: bool | None = None
        self.cos = torch.cat([p.cos for p in positions])  # [N, 1, D]
        self.sin = torch.cat([p.sin for p in positions])
        self.min_rows = min_rows
        self._spans: dict[int | None, list[tuple[int, int]]] = {}

    def spans(self, min_rows: int | None) -> list[tuple[int, int]]:
        """The calls of a linear that is batch-invariant for calls of min_rows rows or more
        (None: not at all). Prefill segments (longer than ROW_WISE_MAX_T) keep their own calls."""
        if min_rows not in self._spans:
            batchable = [min_rows is not None and min_rows <= n <= ROW_WISE_MAX_T for n in self.lengths]
            self._spans[min_rows] = row_spans(self.lengths, batchable)
        return self._spans[min_rows]

    def attends_in_one_call(self, caches: list, dtype: torch.dtype) -> bool:
        """attend.attend_segments takes this pass: every segment short, every cache one the kernel
        reads in `dtype`. Checked on the first layer's caches (a KVCache's layers share dtype
        and layout), once per pass."""
        if self._one_call is None:
            self._one_call = self.short and all(k.dtype == dtype and attend.usable(k) for k, _ in caches)
        return self._one_call

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # x: [N, K] -> [N, N_out]
        spans = self.spans(self.min_rows(module))
        if is_row_parallel(module):  # this rank's partial sums in spans, then ONE all-reduce
            # over every row (elementwise: each row sums as it does alone)
            return module.reduce(apply_in_spans(module.inner, x, spans).contiguous())
        return apply_in_spans(module, x, spans)


def is_row_parallel(module: nn.Module) -> bool:
    """A tensor-parallel rank's row-parallel linear (tensor_split.AllReduced: `inner`, then `reduce`)."""
    return hasattr(module, "reduce") and hasattr(module, "inner")


def apply_in_spans(module: nn.Module, x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    if len(spans) == 1 and spans[0] == (0, x.shape[0]):
        return module(x)
    return torch.cat([module(x[a:b]) for a, b in spans])


class TwoRowFloor(nn.Module):
    """A linear whose 1-row calls take another kernel than its calls of 2+ rows (which all
    agree: invariant_from gave 2; oneDNN's float32 linears, some bf16 shapes): each 1-row
    call is made as a 2-row one (the row and a zero row), so a request's row is bit for bit
    the same alone as batched with others, and such linears batch every request."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K]
        if x.shape[0] != 1:
            return self.inner(x)
        return self.inner(torch.cat([x, torch.zeros_like(x)]))[:1]


def _merged(picks: Sequence[bool], chosen: list, others: list) -> list:
    """One list in the original order from the items where picks[i] (in order) and the rest."""
    chosen_items, other_items = iter(chosen), iter(others)
    return [next(chosen_items) if pick else next(other_items) for pick in picks]


def ragged_head(
    h: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    counts: Sequence[int],
    norm: Callable,
    output: Callable,
    head_from: int | None,
) -> torch.Tensor:
    """output(norm(.)) over the last counts[i] rows of each segment (rows bounds[i] of h):
    [sum(counts), out] float32, each segment's rows bit for bit what it gets alone (one output
    call for consecutive segments of head_from rows or more, see invariant_from)."""
    picked = torch.cat([h[b - n : b] for (_, b), n in zip(bounds, counts)])  # [R, dim]
    spans = row_spans(counts, [head_from is not None and n >= head_from for n in counts])
    return apply_in_spans(output, norm(picked), spans).float()


def invariant_from(module: nn.Module, x: torch.Tensor) -> int | None:
    """From how many rows a call of module gives each row bit for bit what any other call of
    that many rows or more gives it (x: [MAX_BATCH_ROWS, K], the probe): 1 (any call, single
    rows included), 2 (calls of 2+ rows agree, a 1-row call takes another kernel: oneDNN's
    bf16 GEMV for some shapes), or None (the row count changes the sums)."""
    full = module(x)
    sizes = [m for m in INVARIANCE_PROBE_ROWS if m <= x.shape[0]]
    if not all(torch.equal(module(x[:m]), full[:m]) for m in sizes):
        return None
    if not torch.equal(module(x[3:12]), full[3:12]):  # rows at an offset in the call
        return None
    alone = torch.cat([module(x[i : i + 1]) for i in range(x.shape[0])])
    return 1 if torch.equal(alone, full) else 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, dim]
        return elementwise.rms_norm(x, self.weight, self.eps)


def rope_tables(args: ModelArgs, n_positions: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [n_positions, D] in the half-split ("rotate_half") layout transformers uses.

    sin is returned with the first half negated, so that
    rope(x) = x * cos + swap_halves(x) * sin_signed  ==  x * cos + rotate_half(x) * sin.
    """
    inv_freq = args.inv_freq()  # [D/2] float32
    t = torch.arange(n_positions, dtype=torch.int64).float()
    freqs = t[:, None] * inv_freq[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    cos, sin = emb.cos(), emb.sin()
    half = args.head_dim // 2
    sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, n_kv_heads: int | None = None):
        """n_kv_heads: this rank's KV heads under tensor parallelism (default: all of them)."""
        super().__init__()
        self.group = args.n_heads // args.n_kv_heads
        self.n_kv_heads = n_kv_heads or args.n_kv_heads
        self.n_heads, self.head_dim = self.n_kv_heads * self.group, args.head_dim
        self.q_size = self.n_heads * args.head_dim
        self.kv_size = self.n_kv_heads * args.head_dim
        self.scale = args.head_dim**-0.5
        self.wqkv = nn.Linear(args.dim, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(self.q_size, args.dim, bias=args.o_bias)  # tensor-parallel: + all-reduce

    def forward(
        self,
        x: torch.Tensor,  # [T, dim], already normalized
        cache: tuple[torch.Tensor, torch.Tensor],  # k, v of this layer: [KV, S, D]
        pos: Positions,
    ) -> torch.Tensor:  # [T, dim]
        qk, v = self.project(x, pos.cos, pos.sin)
        return self.wo(self.attend(qk, v, cache, pos))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, linear=_call):
        """x: [T, dim] -> qk [T, H + KV, D] with RoPE applied (q and k together), v [T, KV, D]."""
        T = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = linear(self.wqkv, x)  # [T, (H + 2 KV) D]
        qk = elementwise.rope(qkv, H + KV, D, cos, sin)
        return qk, qkv[:, self.q_size + self.kv_size :].view(T, KV, D)

    def attend(
        self,
        qk: torch.Tensor,  # [T, H + KV, D], RoPE applied
        v: torch.Tensor,  # [T, KV, D]
        cache: tuple[torch.Tensor, torch.Tensor],  # k, v of this layer: [KV, S, D]
        pos: Positions,
    ) -> torch.Tensor:  # [T, H*D], before the output projection
        """Write the T new KV entries at pos.start and attend over [0, pos.start + T)."""
        T = qk.shape[0]
        H, KV, G, D = self.n_heads, self.n_kv_heads, self.group, self.head_dim
        k_cache, v_cache = cache
        start = pos.start
        q = qk[:, :H]  # [T, H, D] with H = KV * G
        if T <= ROW_WISE_MAX_T and attend.usable(k_cache):  # the invariance below, by our C kernel (which writes the KV)
            return attend.attend_rows(q, k_cache, v_cache, start, self.scale, new_kv=(qk[:, H:], v)).to(qk.dtype)
        k_cache.narrow(1, start, T).copy_(qk[:, H:].transpose(0, 1))  # [KV, T, D]
        v_cache.narrow(1, start, T).copy_(v.transpose(0, 1))
        keys, values = k_cache.narrow(1, 0, start + T), v_cache.narrow(1, 0, start + T)  # [KV, L, D]
        # GQA without repeating k/v: the G query heads of a kv head form the rows of one
        # [G*T, D] matrix. 4-D inputs take SDPA's fused CPU kernel (3-D ones the slow math path).
        if T <= ROW_WISE_MAX_T:
            # Batch-invariant: each query row is computed exactly as a decode step computes it
            # (same kernel, same shapes), so a verification pass of k drafts gives bit for bit the
            # rows that k+1 decode steps give. A masked pass sums in another order.
            rows = [
                F.scaled_dot_product_attention(
                    q[t].view(1, KV, G, D), keys[None, :, : start + t + 1], values[None, :, : start + t + 1], scale=self.scale
                ).reshape(1, H * D)  # [1, KV, G, D] -> [1, H*D] (CUDA's SDPA may return it strided)
                for t in range(T)
            ]
            return rows[0] if T == 1 else torch.cat(rows)
        q = q.reshape(T, KV, G, D).permute(1, 2, 0, 3).reshape(1, KV, G * T, D)  # rows ordered (g, t)
        out = F.scaled_dot_product_attention(
            q, keys[None], values[None], attn_mask=pos.mask, scale=self.scale
        )  # [1, KV, G*T, D]
        return out.view(KV, G, T, D).permute(2, 0, 1, 3).reshape(T, H * D)

    def forward_ragged(self, x: torch.Tensor, caches: list, positions: list[Positions], rows: "RaggedRows"):
        """x: [N, dim] normalized, the rows of several sequences (segments) one after another;
        each segment attends over its own cache. Returns [N, dim]."""
        qk, v = self.project(x, rows.cos, rows.sin, rows.linear)
        if rows.attends_in_one_call(caches, qk.dtype):
            out = attend.attend_segments(qk, v, caches, rows.starts_i32, rows.lengths_i32, self.scale).to(qk.dtype)
        else:
            out = torch.cat([
                self.attend(qk[a:b], v[a:b], cache, pos) for (a, b), cache, pos in zip(rows.bounds, caches, positions)
            ])
        return rows.linear(self.wo, out)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, hidden: int | None = None):
        """hidden: this rank's intermediate features under tensor parallelism (default: all)."""
        super().__init__()
        self.hidden = hidden or args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * self.hidden, bias=args.mlp_bias)  # gate, up
        self.w2 = nn.Linear(self.hidden, args.dim, bias=args.mlp_bias)  # down; tensor-parallel: + all-reduce

    def forward(self, x: torch.Tensor, linear=_call) -> torch.Tensor:  # x: [T, dim] normalized
        gate_up = linear(self.w13, x)  # [T, 2 I]
        return linear(self.w2, elementwise.silu_mul(gate_up, self.hidden))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, split: TensorSplit | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, split and split.n_kv_heads)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args, split and split.hidden)

    def attention_block(self, h: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], pos: Positions):
        """Residual contribution of attention, [T, dim], for h: [T, dim].

        cache: this layer's (k, v) views [KV, S, D] (KVCache.layer(i)); writes
        KV at [pos.start, pos.start + T) and attends to [0, pos.start + T).
        """
        return self.attention(self.attention_norm(h), cache, pos)

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        """Residual contribution of the MLP: [T, dim]."""
        return self.feed_forward(self.ffn_norm(h))

    def forward(self, h: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], pos: Positions) -> torch.Tensor:
        h = h + self.attention_block(h, cache, pos)
        return h + self.mlp_block(h)

    def attention_ragged(self, h: torch.Tensor, caches: list, positions: list[Positions], rows: RaggedRows):
        """attention_block for the rows of several segments, each over its own cache: [N, dim]."""
        return self.attention.forward_ragged(self.attention_norm(h), caches, positions, rows)

    def mlp_ragged(self, h: torch.Tensor, rows: RaggedRows) -> torch.Tensor:
        """mlp_block for the rows of several segments: [N, dim]."""
        return self.feed_forward(self.ffn_norm(h), rows.linear)

    def forward_ragged(self, h: torch.Tensor, caches: list, positions: list[Positions], rows: RaggedRows) -> torch.Tensor:
        """The rows of several segments (see LlamaModel.forward_batch), each over its own cache."""
        h = h + self.attention_ragged(h, caches, positions, rows)
        return h + self.mlp_ragged(h, rows)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32, split: TensorSplit | None = None):
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.split = split  # this rank's share under tensor parallelism; None = the whole model
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i, split) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # With tied embeddings, load_model points output.weight at tok_embeddings.weight
        # (or at a quantized copy of it).
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope_cos = torch.empty(0)
        self.rope_sin = torch.empty(0)
        self._invariant: dict[int, int | None] | None = None  # id(linear) -> invariant_from (probed once)
        self.fuse_layers = True  # short passes through DecodeLayers where it applies (False: the Python path)
        self._decode_layers: DecodeLayers | None | bool = False  # False: not built yet

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    # -- setup -----------------------------------------------------------------

    def ensure_rope(self, n_positions: int) -> None:
        """Precompute RoPE tables for positions [0, n_positions)."""
        if self.rope_cos.shape[0] >= n_positions and self.rope_cos.device == self.device:
            return
        cos, sin = rope_tables(self.args, n_positions, self.dtype, self.device)
        self.rope_cos, self.rope_sin = cos[:, None, :], sin[:, None, :]  # [P, 1, D]

    def new_cache(self, max_seq_len: int, cache_type: type[KVCache] = KVCache) -> KVCache:
        """A fresh static KV cache (a KVCache, or the subclass cache_type) for one sequence
        of up to max_seq_len positions."""
        a = self.args
        if a.sliding_window is not None and max_seq_len > a.sliding_window:
            raise ValueError(
                f"sliding-window attention is not implemented: max_seq_len {max_seq_len} "
                f"must be <= the model's sliding_window {a.sliding_window}"
            )
        self.ensure_rope(max_seq_len)
        n_kv_heads = self.split.n_kv_heads if self.split else a.n_kv_heads  # tensor-parallel: this rank's heads
        return cache_type(a.n_layers, n_kv_heads, max_seq_len, a.head_dim, dtype=self.dtype, device=self.device)

    def _apply(self, fn, *args, **kwargs):  # .to() / .share_memory() may move what the plan points at
        self._decode_layers = False
        return super()._apply(fn, *args, **kwargs)

    def decode_layers(self) -> DecodeLayers | None:
        """The plan that runs a short pass's layers in one kernel call (layers.py), or None where
        this model cannot take it. Built from the layers' modules at the first short pass."""
        if not self.fuse_layers:
            return None
        if self._decode_layers is False:
            self._decode_layers = DecodeLayers.build(self)
        return self._decode_layers

    def fuses(self, cache: KVCache, T: int) -> bool:
        """Whether a pass of T new rows over `cache` (from its length on) runs its layers in
        one kernel call: DecodeLayers runs this model and takes the cache, and the rows are a
        decode step or a verification, or a prefill chunk ending by FUSED_PREFILL_END."""
        if T > ROW_WISE_MAX_T and cache.length + T > FUSED_PREFILL_END:
            return False
        fused = self.decode_layers()
        return fused is not None and fused.takes(cache)

    def _fused_layers(self, h: torch.Tensor, caches: list[KVCache], starts: list[int], lengths: list[int]) -> None:
        """Run every layer of a pass whose every segment `fuses` (their rows one after another in
        h, updated in place) in one kernel call."""
        self._rope_to(max(a + n for a, n in zip(starts, lengths)))
        self.decode_layers().run(h, caches, starts, lengths, self.rope_cos, self.rope_sin)

    # -- pieces ----------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [T] -> h: [T, dim]
        return self.tok_embeddings(tokens)

    def head(self, h: torch.Tensor, num_logits: int = 1) -> torch.Tensor:  # h: [T, dim] -> [num_logits, vocab] f32
        if num_logits == 0:  # a prefill that only fills the cache
            return torch.empty(0, self.args.vocab_size, device=h.device)
        return self.output(self.norm(h[-num_logits:])).float()

    def _rope_to(self, end: int) -> None:
        """RoPE tables for positions [0, end) at least (grown twofold, not one position at a time)."""
        if end > self.rope_cos.shape[0]:
            self.ensure_rope(max(end, 2 * self.rope_cos.shape[0]))

    def positions(self, start: int, T: int) -> Positions:
        """RoPE rows and causal mask for T new tokens at positions [start, start+T)."""
        self._rope_to(start + T)
        mask = None
        if T > ROW_WISE_MAX_T:  # shorter passes attend row by row, without a mask
            q_pos = torch.arange(start, start + T, device=self.device)  # [T]
            k_pos = torch.arange(start + T, device=self.device)  # [L]
            mask = k_pos[None, :] <= q_pos[:, None]  # [T, L]: query t sees keys [0, start+t]
            mask = mask.repeat(self.args.n_heads // self.args.n_kv_heads, 1)  # [G*T, L], rows (g, t)
        return Positions(start, self.rope_cos[start : start + T], self.rope_sin[start : start + T], mask)

    # -- the default path ------------------------------------------------------

    def _tokens(self, tokens: torch.Tensor, cache: KVCache, num_logits: int) -> torch.Tensor:
        """tokens as a [T] tensor on the model's device, checked against the cache and num_logits."""
        tokens = tokens.reshape(-1)  # accept a 0-d token id too
        if tokens.device != self.device:
            tokens = tokens.to(self.device)
        T = tokens.shape[0]
        start = cache.length
        if T < 1:
            raise ValueError("forward needs at least one token")
        if start + T > cache.capacity:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > capacity {cache.capacity}")
        if not 0 <= num_logits <= T:
            raise ValueError(f"num_logits must be in [0, {T}], got {num_logits}")
        return tokens

    def forward(self, tokens: torch.Tensor, cache: KVCache, num_logits: int = 1) -> torch.Tensor:
        """tokens: [T] ids at positions cache.length.. -> logits [num_logits, vocab] float32.

        Writes T KV entries and advances cache.length by T. num_logits=0 only fills the cache.
        """
        tokens = self._tokens(tokens, cache, num_logits)
        T = tokens.shape[0]
        start = cache.length
        h = self.embed(tokens).contiguous()
        if self.fuses(cache, T):
            self._fused_layers(h, [cache], [start], [T])
        else:
            pos = self.positions(start, T)
            for layer, layer_cache in zip(self.layers, cache.layers):
                h = layer(h, layer_cache, pos)
        cache.length = start + T
        return self.head(h, num_logits)

    # -- batched passes ----------------------------------------------------------

    def linear_invariance(self) -> dict[int, int | None]:
        """id(linear) -> invariant_from (1 or None) up to MAX_BATCH_ROWS rows. Probed once
        per kind of linear (its repr: class, shapes, quantization; a GGUF file's layers may
        mix kinds), on random rows; a linear whose calls of 2+ rows agree but whose 1-row
        call does not is replaced by a TwoRowFloor of it (then invariant from 1). Done when
        the model is loaded, before any pass (a pass before it would round otherwise)."""
        if self._invariant is None:
            a = self.args
            linears = [  # (owner, attribute, fan-in; in_features: a tensor-parallel rank's share)
                *((layer.attention, "wqkv", a.dim) for layer in self.layers),
                *((layer.attention, "wo", layer.attention.wo.in_features) for layer in self.layers),
                *((layer.feed_forward, "w13", a.dim) for layer in self.layers),
                *((layer.feed_forward, "w2", layer.feed_forward.w2.in_features) for layer in self.layers),
                (self, "output", a.dim),
            ]
            generator = torch.Generator().manual_seed(0)
            by_kind: dict[str, int | None] = {}
            self._invariant = {}
            with torch.inference_mode():
                for owner, name, fan_in in linears:
                    module = getattr(owner, name)
                    if module is None:  # a tensor-parallel follower has no output head
                        continue
                    reduced = module if is_row_parallel(module) else None
                    if reduced is not None:  # probe (and floor) this rank's part: no all-reduce outside a pass
                        owner, name, module = reduced, "inner", reduced.inner
                    kind = repr(module)
                    if kind not in by_kind:
                        x = torch.randn(MAX_BATCH_ROWS, fan_in, generator=generator).to(self.device, self.dtype)
                        by_kind[kind] = invariant_from(module, x)
                    if by_kind[kind] == 2:
                        module = TwoRowFloor(module)
                        setattr(owner, name, module)
                    self._invariant[id(module)] = 1 if by_kind[kind] == 2 else by_kind[kind]
                    if reduced is not None:  # RaggedRows asks by the row-parallel linear
                        self._invariant[id(reduced)] = self._invariant[id(module)]
        return self._invariant

    def forward_batch(self, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """One pass over several sequences, each T_i new tokens over its own cache (ragged):
        logits [num_logits_i, vocab] float32 per segment, and each cache advanced by T_i.

        Each segment gets bit for bit what `forward` gives it alone: the segments that `fuses`
        take one kernel call (every kernel computes a row on its own), the others the
        layer-by-layer path, where attention runs per segment (row by row for T_i <=
        ROW_WISE_MAX_T) and a linear takes all the segments' rows in one call only where it is
        batch-invariant (see linear_invariance)."""
        if len(segments) == 1:  # one request: the plain pass (the same rows, less bookkeeping)
            return [self.forward(segments[0].tokens, segments[0].cache, segments[0].num_logits)]
        if len({id(s.cache) for s in segments}) != len(segments):
            raise ValueError("forward_batch: one segment per cache")
        fused = [self.fuses(s.cache, s.tokens.numel()) for s in segments]
        if any(fused) and not all(fused):  # two passes: each segment takes its own path
            return _merged(fused, self.forward_batch([s for s, f in zip(segments, fused) if f]),
                           self.forward_batch([s for s, f in zip(segments, fused) if not f]))
        tokens = [self._tokens(s.tokens, s.cache, s.num_logits) for s in segments]
        lengths = [t.shape[0] for t in tokens]
        starts = [s.cache.length for s in segments]
        h = self.embed(torch.cat(tokens)).contiguous()  # [N, dim]
        if all(fused):
            self._fused_layers(h, [s.cache for s in segments], starts, lengths)
            bounds = segment_bounds(lengths)
        else:
            positions, rows = self.ragged_rows(starts, lengths)
            for i, layer in enumerate(self.layers):
                h = layer.forward_ragged(h, [s.cache.layers[i] for s in segments], positions, rows)
            bounds = rows.bounds
        for s, T in zip(segments, lengths):
            s.cache.length += T
        return self.head_batch(h, bounds, [s.num_logits for s in segments])

    def ragged_rows(self, starts: Sequence[int], lengths: Sequence[int]) -> tuple[list[Positions], RaggedRows]:
        """The positions of segments of lengths[i] new tokens at starts[i].., and their rows."""
        positions = [self.positions(start, T) for start, T in zip(starts, lengths)]
        return positions, RaggedRows(lengths, positions, lambda module: self.linear_invariance().get(id(module)))

    def head_batch(self, h: torch.Tensor, bounds: Sequence[tuple[int, int]], counts: Sequence[int]) -> list[torch.Tensor]:
        """`head` per segment (rows bounds[i] of h, its last counts[i] rows): logits [counts[i], vocab] f32 each."""
        if not any(counts):
            return [torch.empty(0, self.args.vocab_size, device=h.device) for _ in counts]
        head_from = self.linear_invariance().get(id(self.output))
        logits = ragged_head(h, bounds, counts, self.norm, self.output, head_from)  # [R, vocab]
        return list(logits.split(list(counts)))

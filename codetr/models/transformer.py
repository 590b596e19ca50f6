"""Deformable transformer: encoder over multi-scale tokens, decoder with box reference points,
iterative refinement and look-forward-twice (DINO)."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .detector import Memory
from .ms_deform_attn import MSDeformAttn
from .position_encoding import coord_sine_embed


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class _ChunkedFFN(torch.autograd.Function):
    """Linear(ReLU(Linear(x))) over 2-d tokens in row chunks, the [chunk, dim_ff] activation
    recomputed in the backward instead of kept.

    Why: a whole-sequence activation ([13600, 2048] for batch 2 at 512 x 640, 111 MB per
    encoder layer) is fresh mmap memory each time it is allocated, and filling it (addmm's
    bias copy, the ReLU mask in the backward) costs as much as a matmul; the chunk buffers are
    heap memory reused chunk after chunk. The chunked matmuls give the same values as the
    whole ones up to summation order; the backward costs one more [chunk, d] x [d, dim_ff]
    matmul per chunk than storing the activation, and saves its memory.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, chunk: int):
        out = x.new_empty(x.shape[0], w2.shape[0])
        h = None
        for i in range(0, x.shape[0], chunk):
            xc = x[i : i + chunk]
            h = torch.addmm(b1, xc, w1.t(), out=_buffer(h, xc, w1.shape[0]))
            torch.addmm(b2, h.relu_(), w2.t(), out=out[i : i + chunk])
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.chunk = chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w1, b1, w2 = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w1 = torch.zeros_like(w1) if need_w1 else None
        grad_b1 = torch.zeros_like(b1) if need_b1 else None
        grad_w2 = torch.zeros_like(w2) if need_w2 else None
        h = gh = None
        for i in range(0, x.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            xc, gy = x[rows], grad_out[rows]
            h = torch.addmm(b1, xc, w1.t(), out=_buffer(h, xc, w1.shape[0])).relu_()
            if need_w2:
                grad_w2.addmm_(gy.t(), h)
            if not (need_x or need_w1 or need_b1):
                continue
            gh = torch.mm(gy, w2, out=_buffer(gh, xc, w2.shape[1]))
            # ReLU's backward in place, one pass (masked_fill_(h == 0, 0) is 18x slower)
            torch.ops.aten.threshold_backward.grad_input(gh, h, 0, grad_input=gh)
            if need_w1:
                grad_w1.addmm_(gh.t(), xc)
            if need_b1:
                grad_b1 += gh.sum(0)
            if need_x:
                torch.mm(gh, w1, out=grad_x[rows])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_out.sum(0) if need_b2 else None, None


def _buffer(buf: Optional[torch.Tensor], chunk: torch.Tensor, cols: int) -> torch.Tensor:
    """A [len(chunk), cols] buffer: `buf` reused (the last, shorter chunk takes its leading
    rows), or a new one on the first chunk."""
    rows = chunk.shape[0]
    if buf is not None and buf.shape[0] >= rows:
        return buf[:rows]
    return chunk.new_empty(rows, cols)


class FFN(nn.Module):
    """Post-norm feed-forward block: x + Linear(ReLU(Linear(x))) -> LayerNorm.

    Without active dropout or autocast, the two linears run as `_ChunkedFFN` (chunks of
    CHUNK tokens, the activation recomputed in the backward): an encoder FFN at 800 x 1216
    inference 300-335 -> 247 ms (chunks of 512: 258, 1024: 248, 4096: 298); r50 training
    step at 512 x 640 in benchmarks/results/vs_transformers.json.
    """

    CHUNK = 2048

    def __init__(self, d_model: int, dim_ff: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_model, dim_ff), nn.Linear(dim_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        # Dropout and autocast need the plain ops, and so do the compiler's tracers (export).
        if ((self.training and self.dropout.p > 0) or torch.is_autocast_enabled(x.device.type)
                or torch.compiler.is_compiling()):
            out = self.linear2(self.dropout(F.relu(self.linear1(flat))))
        else:
            out = _ChunkedFFN.apply(flat, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                    self.linear2.bias, self.CHUNK)
        return self.norm(x + self.dropout(out.view_as(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, dim_ff: int, n_levels: int, n_heads: int, n_points: int, dropout: float):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_ff, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        out = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        return self.ffn(self.norm(src + self.dropout(out)))


class DeformableEncoder(nn.Module):
    """Args: d_model, num_layers, dim_ff (FFN hidden size), n_levels, n_heads, n_points, dropout.

    ``forward(src [B, S, C], pos [B, S, C], shapes (L pairs of ints (H_l, W_l)),
    spatial_shapes [L, 2] and level_start_index [L] (the same as tensors, ``level_index``),
    valid_ratios [B, L, 2] (w, h fraction of each level that is not padding),
    padding_mask [B, S])`` -> memory ``[B, S, C]``.
    """

    def __init__(self, d_model: int = 256, num_layers: int = 6, dim_ff: int = 2048, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, dropout: float = 0.0):
        super().__init__()
        layer = EncoderLayer(d_model, dim_ff, n_levels, n_heads, n_points, dropout)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """[B, S, L, 2]: each token's pixel centre, normalised by its level's *valid* extent,
        then mapped into every level's padded frame (x valid_ratio of that level)."""
        refs = []
        for lvl, (H, W) in enumerate(shapes):
            ys, xs = torch.meshgrid(
                torch.arange(H, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                torch.arange(W, dtype=torch.float32, device=valid_ratios.device) + 0.5, indexing="ij")
            ref_y = ys.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * H)
            ref_x = xs.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * W)
            refs.append(torch.stack((ref_x, ref_y), -1))
        refs = torch.cat(refs, 1)
        return refs[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, shapes, spatial_shapes, level_start_index, valid_ratios, padding_mask):
        ref = self.reference_points(shapes, valid_ratios).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """Self-attention among queries -> deformable cross-attention -> FFN, post-norm."""

    def __init__(self, d_model: int, dim_ff: int, n_levels: int, n_heads: int, n_points: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, dim_ff, dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, self_attn_mask=None):
        q = k = tgt + query_pos
        out = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(out))
        out = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                              memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout(out))
        return self.ffn(tgt)


class DeformableDecoder(nn.Module):
    """Decoder with iterative box refinement. It owns one box head per layer (``bbox_heads``)
    because each layer's refined boxes are the next layer's references.

    The forward takes the queries, their positions and reference boxes as arguments (it is
    not tied to the two-stage selection), so Co-DETR can run extra query groups (customised
    positive queries) through the same decoder.

    Args: d_model, num_layers, dim_ff, n_levels, n_heads, n_points, dropout;
        dynamic_query_pos: False (official Deformable-DETR / Co-DETR): every layer uses the
            ``query_pos`` it is given, unchanged. True (DINO / DAB style, our variant): a
            ``ref_point_head`` MLP recomputes the position from each layer's current
            reference box, sine(cx, cy, w, h) -> 2-layer MLP, and adds ``query_pos`` if given.
    """

    def __init__(self, d_model: int = 256, num_layers: int = 6, dim_ff: int = 2048, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, dropout: float = 0.0, dynamic_query_pos: bool = False):
        super().__init__()
        layer = DecoderLayer(d_model, dim_ff, n_levels, n_heads, n_points, dropout)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.d_model = d_model
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if dynamic_query_pos else None
        self.bbox_heads = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_layers))
        for head in self.bbox_heads:
            # Start as the identity refinement: boxes equal their references.
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def project_memory(self, memory: Memory) -> list[torch.Tensor]:
        """Each layer's cross-attention values [B, S, M, C/M] of ``memory``."""
        return [layer.cross_attn.project_value(memory.memory, memory.padding_mask) for layer in self.layers]

    def forward(self, query: torch.Tensor, query_pos: Optional[torch.Tensor], reference_boxes: torch.Tensor,
                memory: Memory, self_attn_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query: [B, Q, C] content queries.
            query_pos: [B, Q, C] query positions (required unless dynamic_query_pos).
            reference_boxes: [B, Q, 4] initial boxes (cx, cy, w, h) of the unpadded image,
                usually in [0, 1]; treated as constants (detach them if they come from a
                network).
            memory: the encoder output (``Memory``; its ``values`` are used when set).
            self_attn_mask: optional [Q, Q] or [B * n_heads, Q, Q] bool mask (True = blocked)
                for query groups that must not see each other.
        Returns:
            hidden: [num_layers, B, Q, C] every layer's output queries.
            boxes: [num_layers, B, Q, 4] every layer's predicted boxes (cx, cy, w, h) in [0, 1].
                Look-forward-twice: layer i's box adds its delta to layer i-1's *undetached*
                box, so layer i's loss also trains layer i-1's box head; the reference that
                layer i+1 samples around is detached (stable refinement).
        """
        if query_pos is None and self.ref_point_head is None:
            raise ValueError("query_pos is required when the decoder's query position is static")
        ref = reference_boxes.detach()
        prev_box = ref  # layer i-1's refined box, undetached (the input boxes for layer 0)
        hidden, boxes = [], []
        vr = torch.cat((memory.valid_ratios, memory.valid_ratios), -1)[:, None]  # [B, 1, L, 4]
        out = query
        for i, layer in enumerate(self.layers):
            ref_input = ref[:, :, None] * vr  # boxes in each level's padded frame
            pos = query_pos
            if self.ref_point_head is not None:
                pos = self.ref_point_head(coord_sine_embed(ref, self.d_model // 2))
                pos = pos if query_pos is None else pos + query_pos
            value = memory.memory if memory.values is None else memory.values[i]
            out = layer(out, pos, ref_input, value, memory.spatial_shapes, memory.level_start_index,
                        memory.padding_mask, self_attn_mask)
            delta = self.bbox_heads[i](out)
            # Same value as `refined`, but the gradient also reaches layer i-1's box head.
            boxes.append((delta + inverse_sigmoid(prev_box)).sigmoid())
            hidden.append(out)
            refined = (delta + inverse_sigmoid(ref)).sigmoid()  # gradient to this layer only
            prev_box = refined
            ref = refined.detach()
        return torch.stack(hidden), torch.stack(boxes)

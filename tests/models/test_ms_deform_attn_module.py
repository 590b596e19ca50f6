"""The MSDeformAttn module: shapes, gradients to every parameter, compiled == reference."""
import pytest
import torch

import codetr
from codetr.models import MSDeformAttn


def make_batch(N=2, Q=7, C=32, levels=((8, 10), (4, 5), (2, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    query = torch.randn(N, Q, C, generator=g)
    value = torch.randn(N, S, C, generator=g)
    return query, value, shapes, starts


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_output_shape_and_gradients_reach_every_parameter(ref_dim):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, value, shapes, starts = make_batch()
    ref = torch.rand(2, 7, 3, ref_dim) * 0.5 + 0.25
    out = attn(query, ref, value, shapes, starts)
    assert out.shape == (2, 7, 32)
    out.square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_compiled_and_reference_paths_agree(ref_dim):
    assert codetr.ops.extension_info()["ops"]["ms_deform_attn"]["cpu"] == "compiled"
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2).double()
    # Non-zero offset and attention weights, so every path is exercised.
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.5)
    query, value, shapes, starts = (t.double() if t.is_floating_point() else t for t in make_batch())
    ref = (torch.rand(2, 7, 3, ref_dim) * 0.8 + 0.1).double()
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[1, -20:] = True
    outs, grads = [], []
    for mode in ("auto", "reference"):
        codetr.ops.set_ops_mode(mode)
        try:
            attn.zero_grad()
            out = attn(query, ref, value, shapes, starts, mask)
            out.sum().backward()
        finally:
            codetr.ops.set_ops_mode("auto")
        outs.append(out)
        grads.append([p.grad.clone() for p in attn.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_padding_mask_removes_padded_values():
    """Values at masked positions cannot influence the output."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, value, shapes, starts = make_batch()
    ref = torch.rand(2, 7, 3, 2)
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[:, 30:50] = True
    changed = value.clone()
    changed[:, 30:50] = 1e3 * torch.randn(2, 20, 32)
    torch.testing.assert_close(attn(query, ref, value, shapes, starts, mask),
                               attn(query, ref, changed, shapes, starts, mask))


def test_initial_offsets_follow_deformable_detr():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 points along +x, head 1 along +y, at radii 1, 2, 3 on every level.
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.all(attn.attention_weights.weight == 0)


def test_bad_reference_points():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, value, shapes, starts = make_batch()
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.rand(2, 7, 3, 3), value, shapes, starts)
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads"):
        MSDeformAttn(d_model=30, n_heads=4)

"""Loads a CMake-built libcodetr_ops.so (argv[1]) WITHOUT importing codetr, and checks
torch.ops.codetr.ms_deform_attn (+ backward) against an inline grid_sample reference."""
import sys
import torch
import torch.nn.functional as F

torch.ops.load_library(sys.argv[1])
print("loaded", sys.argv[1])
for key in ("CPU", "CUDA"):
    print(f"  {key} kernel:",
          torch._C._dispatch_has_kernel_for_dispatch_key("codetr::ms_deform_attn", key),
          torch._C._dispatch_has_kernel_for_dispatch_key("codetr::ms_deform_attn_backward", key))


def reference(value, shapes, starts, loc, attn):
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    grids = (2 * loc - 1).transpose(1, 2).flatten(0, 1)
    w = attn.transpose(1, 2).flatten(0, 1)
    out = value.new_zeros((N * M, D, Q))
    for lvl, ((H, W), s) in enumerate(zip(shapes.tolist(), starts.tolist())):
        v = value[:, s:s + H * W].permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        smp = F.grid_sample(v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        out = out + (smp * w[:, None, :, lvl]).sum(-1)
    return out.view(N, M * D, Q).transpose(1, 2).contiguous()


def case(name, shapes_list, N=2, Q=7, M=2, D=5, P=3, dtype=torch.float64, loc_fn=None,
         noncontig=False):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(shapes_list, dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes_list)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=dtype)
    if loc_fn is not None:
        loc = loc_fn(loc, shapes).to(dtype)
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=dtype).softmax(-1)
    if noncontig:  # same values, non-contiguous strides
        value = value.transpose(1, 2).contiguous().transpose(1, 2)
        loc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    out = torch.ops.codetr.ms_deform_attn(value, shapes, starts, loc, attn)
    v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    ref = reference(v, shapes, starts, l, a)
    go = torch.randn(ref.shape, generator=g, dtype=dtype)
    ref.backward(go)
    gv, gl, ga = torch.ops.codetr.ms_deform_attn_backward(go, value, shapes, starts, loc, attn)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
    errs = []
    for n, x, y in (("out", out, ref.detach()), ("grad_value", gv, v.grad),
                    ("grad_attn", ga, a.grad)):
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name} {n}: {m}")
        errs.append(f"{n} {float((x - y).abs().amax()) if x.numel() else 0.0:.1e}")
    # grad of the location is discontinuous exactly on pixel boundaries: compare only
    # the generic (random) cases.
    if loc_fn is None:
        torch.testing.assert_close(gl, l.grad, **tol, msg=lambda m: f"{name} grad_loc: {m}")
        errs.append(f"grad_loc {float((gl - l.grad).abs().amax()) if gl.numel() else 0.0:.1e}")
    print(f"  ok {name}: " + ", ".join(errs))


def out_of_map(loc, shapes):
    # outside on every side, partly outside (one corner in), and far away
    vals = torch.tensor([-0.5, -1e-3, 1.0 + 1e-3, 1.7, -100.0, 100.0, 0.0, 1.0])
    idx = torch.randint(0, len(vals), loc.shape, generator=torch.Generator().manual_seed(1))
    return torch.where(torch.rand(loc.shape) < 0.6, vals[idx].to(loc.dtype), loc)


def borders(loc, shapes):
    # exactly on pixel edges / centres and on the map border: loc = k / (2 * size)
    out = loc.clone()
    g = torch.Generator().manual_seed(2)
    for lvl, (H, W) in enumerate(shapes.tolist()):
        for c, size in ((0, W), (1, H)):
            k = torch.randint(-1, 2 * size + 2, out[..., lvl, :, c].shape, generator=g)
            out[..., lvl, :, c] = k.to(out.dtype) / (2 * size)
    return out


case("random fp64", [[6, 8], [3, 4], [1, 2]])
case("random fp32", [[6, 8], [3, 4], [1, 2]], dtype=torch.float32, Q=130)  # > one 64-query block
case("non-contiguous", [[5, 7], [3, 3]], noncontig=True)
case("1x1 level", [[1, 1], [2, 1]])
case("out-of-map", [[6, 8], [3, 4], [1, 2]], loc_fn=out_of_map)
case("pixel edges/border", [[6, 8], [3, 4], [1, 2]], loc_fn=borders)
case("empty queries", [[4, 4]], Q=0)
print("ALL OK")

import pytest
import torch

from codetr.models.backbones import EfficientNetLite0, ResNet50, efficientnet_lite0_weights_path


def test_resnet50_keys_and_outputs_match_torchvision(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    ref = tvm.resnet50().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong BN order/eps would show
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    path = tmp_path / "r50.pth"
    torch.save(ref.state_dict(), path)
    ours = ResNet50(weights=str(path))
    want = [k for k in ref.state_dict() if not k.startswith("fc.")]
    assert list(ours.state_dict()) == want

    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        feats = ours(x)
        y = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            y = getattr(ref, name)(y)
            expected.append(y)
    assert [f.shape[1] for f in feats] == list(ours.out_channels) == [512, 1024, 2048]
    for f, e in zip(feats, expected[1:]):
        # BN is folded into one scale+shift here: float rounding differs slightly
        torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-3 * e.abs().max().item())
    # stem + layer1 frozen, the rest trainable
    assert not any(p.requires_grad for p in ours.layer1.parameters())
    assert not ours.conv1.weight.requires_grad and ours.layer2[0].conv1.weight.requires_grad


def test_efficientnet_lite0_loads_every_shipped_tensor():
    sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    full = EfficientNetLite0(pretrained=True, include_head_conv=True)
    own = full.state_dict()
    # every checkpoint tensor except the ImageNet classifier is loaded, bit-exactly
    assert full.unused_from_checkpoint == ["_fc.bias", "_fc.weight"]
    assert set(own) == set(sd) - {"_fc.weight", "_fc.bias"}
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k
    # the default backbone stops at the last block: only the classifier head is left out
    small = EfficientNetLite0(pretrained=True)
    assert all(k.startswith(("_fc.", "_conv_head.", "_bn1.")) for k in small.unused_from_checkpoint)
    assert len(small.state_dict()) + len(small.unused_from_checkpoint) == len(sd)


def test_efficientnet_lite0_shapes_and_imagenet_sanity():
    net = EfficientNetLite0(pretrained=True, include_head_conv=True)
    sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        feats = net(x)
        # the shipped classifier applies to our pooled features (shapes and values line up)
        logits = torch.nn.functional.linear(feats[-1].mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])
    assert [tuple(f.shape[1:]) for f in feats] == [(40, 16, 20), (112, 8, 10), (1280, 4, 5)]
    assert torch.isfinite(logits).all() and logits.shape == (2, 1000)
    assert 0 < feats[0].abs().mean() < 10

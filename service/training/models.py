"""Network registry: the small MNIST CNN, the reference's 3-stage "ResNet-50", and a CIFAR ResNet-18.

Every network built here takes float32 pixels (B, C, H, W) in [0, 1] and applies the normalisation
``(x - 0.5) / 0.5`` itself, so the exported ONNX graph carries it (SPEC section 3) and the server, the pool and the
attacks all work in [0, 1] units. Networks use BatchNorm, which is batch-independent in eval mode (SPEC 6.6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)

#: normalisation applied inside every network: the model sees (x - MEAN) / STD, i.e. values in [-1, 1]
NORM_MEAN = 0.5
NORM_STD = 0.5


class Normalize(nn.Module):
    """``(x - mean) / std`` with the same scalar on every channel (an affine map, so blending commutes with it)."""

    def __init__(self, mean: float = NORM_MEAN, std: float = NORM_STD) -> None:
        super().__init__()
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``logits = head(normalize(x))``: the exported unit; input float32 (B,C,H,W) in [0,1], output (B, K)."""

    def __init__(self, body: nn.Module, arch: str, n_classes: int, in_channels: int) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.body = body
        self.arch = arch
        self.n_classes = n_classes
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


# --- small CNN for 28x28 ---------------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class MnistCNN(nn.Module):
    """Three conv stages (32/64/128 channels, 3x3, BN, ReLU, 2x2 max-pool) and a 2-layer head; 0.24 M params.

    Sized for 28x28 inputs (other sizes >= 8 work: the last feature map is pooled or resized to 3x3); about
    7.6 M multiply-adds per image at 28x28.
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 32),
            nn.MaxPool2d(2),  # 14x14
            *_conv_bn(32, 64),
            nn.MaxPool2d(2),  # 7x7
            *_conv_bn(64, 128),
            nn.MaxPool2d(2),  # 3x3
        )
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 9, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        h, w = int(y.shape[-2]), int(y.shape[-1])
        if h % 3 or w % 3:
            # ONNX has no adaptive pooling to a size that does not divide the input (e.g. 4x4 for 32x32 inputs):
            # resize the final feature map to the 3x3 grid instead; 28x28 inputs (3x3 already) never come here
            return self.head(torch.nn.functional.interpolate(y, size=(3, 3), mode="bilinear", align_corners=False))
        return self.head(self.pool(y))


# --- the reference "ResNet-50" (resnet_3layer.py of P2333/Mixup-Inference) --------------------------------------
class Bottleneck(nn.Module):
    """Post-activation bottleneck with expansion 1: 1x1 -> 3x3 (stride) -> 1x1, BN after each, ReLU after add."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class BasicBlock(nn.Module):
    """Post-activation basic block (two 3x3 convs) for ResNet-18."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv (stride 1, no max-pool), stages, global average pool, linear head.

    Args:
        block: ``Bottleneck`` or ``BasicBlock``.
        num_blocks: blocks per stage.
        widths: channels per stage (strides are 1 for the first stage, 2 after).
        stem_kernel: 5 for the reference "ResNet-50", 3 for ResNet-18.
    """

    def __init__(
        self,
        block: type[Bottleneck] | type[BasicBlock],
        num_blocks: tuple[int, ...],
        widths: tuple[int, ...],
        *,
        n_classes: int,
        in_channels: int,
        stem_kernel: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0], kernel=stem_kernel))
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, (n, width) in enumerate(zip(num_blocks, widths, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_planes, width, stride))
                in_planes = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.stages(self.stem(x)))
        return self.linear(torch.flatten(y, 1))


def _mnist_cnn(n_classes: int, in_channels: int) -> nn.Module:
    return MnistCNN(n_classes, in_channels)


def _resnet50_3layer(n_classes: int, in_channels: int) -> nn.Module:
    """SPEC section 8: 5x5 stem (64), 3 stages x 5 bottlenecks, widths 64/128/256, strides 1/2/2, expansion 1."""
    return ResNet(Bottleneck, (5, 5, 5), (64, 128, 256), n_classes=n_classes, in_channels=in_channels, stem_kernel=5)


def _resnet18(n_classes: int, in_channels: int) -> nn.Module:
    return ResNet(
        BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), n_classes=n_classes, in_channels=in_channels, stem_kernel=3
    )


#: architecture name (as recorded in the manifest) -> builder(n_classes, in_channels) of the un-normalised body
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "mnist_cnn": _mnist_cnn,
    "resnet50_3layer": _resnet50_3layer,
    "resnet18": _resnet18,
}


def build_model(arch: str, n_classes: int, in_channels: int) -> Classifier:
    """Build a registered network with the [0,1] -> [-1,1] normalisation inside.

    Args:
        arch: a key of :data:`MODELS`, or ``PACKAGE.MODULE:FACTORY`` (the user's own network, :func:`user_body`).
        n_classes: number of output logits (>= 2).
        in_channels: 1 (grey) or 3 (RGB).

    Returns:
        A module mapping float32 (B, C, H, W) in [0, 1] to logits (B, n_classes), in train mode.

    Raises:
        ValueError: unknown architecture or bad sizes.
    """
    if arch not in MODELS and ":" not in arch:
        raise ValueError(f"unknown architecture {arch!r}, expected one of {sorted(MODELS)} or PACKAGE.MODULE:FACTORY")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    body = MODELS[arch](n_classes, in_channels) if arch in MODELS else user_body(arch, n_classes)
    return Classifier(body, arch, n_classes, in_channels)


def user_body(arch: str, n_classes: int) -> nn.Module:
    """The user's network from ``PACKAGE.MODULE:FACTORY``: ``FACTORY(n_classes)`` must return a ``torch.nn.Module``.

    It receives what every built-in body receives: the normalised pixels ``(x - 0.5) / 0.5`` (B, C, H, W).

    Raises:
        ValueError: the module or factory cannot be imported, or the factory returns no ``nn.Module``.
    """
    import importlib

    module_name, _, factory_name = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--arch {arch}: expected an importable PACKAGE.MODULE:FACTORY, got {exc}") from None
    body = factory(n_classes)
    if not isinstance(body, nn.Module):
        raise ValueError(f"--arch {arch}: expected FACTORY(n_classes) to return a torch.nn.Module, got {type(body)}")
    return body


def load_weights(model: nn.Module, weights_path: Path) -> None:
    """Load a ``weights.safetensors`` file into ``model`` (strict: every tensor must match; no pickle)."""
    from safetensors.torch import load_file

    state = load_file(str(weights_path))
    model.load_state_dict(state, strict=True)


def save_weights(model: nn.Module, weights_path: Path) -> None:
    """Write ``model``'s state dict as safetensors (contiguous CPU copies)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))
    Path(weights_path).chmod(0o644)  # safetensors creates the file owner-only; bundles are read by other users


def load_bundle_model(bundle: Bundle | Path | str) -> Classifier:
    """Rebuild the network a bundle was exported from, with its weights, in eval mode on the CPU.

    Args:
        bundle: a loaded :class:`service.store.Bundle`, or a bundle directory (then verified with
            ``load_bundle(path, require_weights=True)``).

    Returns:
        The torch module whose ONNX export is the bundle's ``model.onnx`` (same input and output contract).

    Raises:
        BundleError: the bundle has no weights file or fails verification.
        service.importing.twin.TwinUnavailableError: an imported bundle whose graph has no faithful torch conversion.
    """
    from service.errors import BundleError

    if isinstance(bundle, (str, Path)):
        from service.store import load_bundle

        bundle = load_bundle(Path(bundle), require_weights=True)
    b: Any = bundle
    manifest = b.manifest
    if manifest.imported is not None:  # an imported graph: its twin is model.onnx in torch
        from service.importing.twin import bundle_twin

        twin: Any = bundle_twin(b)
        return twin
    if b.weights is None:
        raise BundleError(f"bundle {b.path} has no weights.safetensors, needed to rebuild the torch model")
    from safetensors.torch import load as load_safetensors

    model = build_model(manifest.architecture, manifest.n_classes, manifest.input.shape[0])
    model.load_state_dict(load_safetensors(b.weights), strict=True)  # the bytes the store hashed
    model.eval()
    LOGGER.info(
        "rebuilt %s (%d classes) from %s/weights.safetensors", manifest.architecture, manifest.n_classes, b.path
    )
    return model

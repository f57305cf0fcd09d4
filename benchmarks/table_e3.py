"""Convolution layers of Table E3 of the core paper (all conv layers of 9 CNNs), as data.

Parsed once from the supplement's sections "(a) 3c3d" ... "(i) MobileNetV2" (reference text
``000_6a144652fdfb8da1.txt``, §E) and written here literally; nothing is parsed at run time.
Layers with identical hyper-parameters appear once with their multiplicity ``count``.

Each row of :data:`ROWS` is ``(net, name, count, input_shape, output_shape, kernel, stride, padding,
dilation, groups, bias, type)`` with shapes ``(C, H, W)`` of one sample and ``type`` one of
``"General"``, ``"Dense"``, ``"Dense mix"``, ``"Down"`` (the paper's classification; note that the
paper types ConvNeXt's ``K = S`` patchify layers as ``"Dense"``). Names are as printed in the table;
the text extraction turned InceptionV3's underscores into dots (``Conv2d.1a.3x3.conv`` is
torchvision's ``Conv2d_1a_3x3.conv``).

:data:`ANCHOR_NAMES` maps ``(net, name)`` of the 66 layers measured in
``shared/anchors/anchor_ops.jsonl`` to the layer name used there (torchvision's module name,
without InceptionV3's trailing ``.conv``); it differs from the table's name only for InceptionV3.

Batch sizes (core paper §F, anchors' README): 128 for 3c3d, 2c2d, All-CNN-C; 32 for the ImageNet nets.
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple


class ConvLayer(NamedTuple):
    net: str
    name: str
    count: int
    input_shape: Tuple[int, int, int]
    output_shape: Tuple[int, int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    bias: bool
    type: str

    @property
    def batch_size(self) -> int:
        return BATCH_SIZE[self.net]

    @property
    def key(self) -> Tuple[str, str]:
        return (self.net, self.name)

    @property
    def anchor_name(self):
        """Name of this layer in the anchors' ``anchor_ops.jsonl`` (``None`` if not measured there)."""
        return ANCHOR_NAMES.get(self.key)


#: nets in the table's order, with the key used here and in the anchors
NETS = ["3c3d", "2c2d", "allcnnc", "alexnet", "resnet18", "resnext101", "convnext", "inceptionv3", "mobilenetv2"]

BATCH_SIZE = {
    "3c3d": 128, "2c2d": 128, "allcnnc": 128,
    "alexnet": 32, "resnet18": 32, "resnext101": 32, "convnext": 32, "inceptionv3": 32, "mobilenetv2": 32,
}

TYPES = ["General", "Dense", "Dense mix", "Down"]

# (net, name, count, input (C, H, W), output (C, H, W), kernel, stride, padding, dilation, groups, bias, type)
ROWS = [
    ('3c3d', 'conv1.0', 1, (3, 32, 32), (64, 28, 28), (5, 5), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('3c3d', 'conv2.0', 1, (64, 14, 14), (96, 12, 12), (3, 3), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('3c3d', 'conv3.1', 1, (96, 8, 8), (128, 6, 6), (3, 3), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('2c2d', 'conv1.1', 1, (1, 32, 32), (32, 28, 28), (5, 5), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('2c2d', 'conv2.1', 1, (32, 18, 18), (64, 14, 14), (5, 5), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv1.1', 1, (3, 34, 34), (96, 32, 32), (3, 3), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv2.1', 1, (96, 34, 34), (96, 32, 32), (3, 3), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv3.1', 1, (96, 33, 33), (96, 16, 16), (3, 3), (2, 2), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv4.1', 1, (96, 18, 18), (192, 16, 16), (3, 3), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv5.1', 1, (192, 18, 18), (192, 16, 16), (3, 3), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv6.1', 1, (192, 17, 17), (192, 8, 8), (3, 3), (2, 2), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv7.0', 1, (192, 8, 8), (192, 6, 6), (3, 3), (1, 1), (0, 0), (1, 1), 1, True, 'General'),
    ('allcnnc', 'conv8.1', 1, (192, 6, 6), (192, 6, 6), (1, 1), (1, 1), (0, 0), (1, 1), 1, True, 'Dense'),
    ('allcnnc', 'conv9.1', 1, (192, 6, 6), (100, 6, 6), (1, 1), (1, 1), (0, 0), (1, 1), 1, True, 'Dense'),
    ('alexnet', 'features.0', 1, (3, 256, 256), (64, 63, 63), (11, 11), (4, 4), (2, 2), (1, 1), 1, True, 'General'),
    ('alexnet', 'features.3', 1, (64, 31, 31), (192, 31, 31), (5, 5), (1, 1), (2, 2), (1, 1), 1, True, 'General'),
    ('alexnet', 'features.6', 1, (192, 15, 15), (384, 15, 15), (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 'General'),
    ('alexnet', 'features.8', 1, (384, 15, 15), (256, 15, 15), (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 'General'),
    ('alexnet', 'features.10', 1, (256, 15, 15), (256, 15, 15), (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 'General'),
    ('resnet18', 'conv1', 1, (3, 256, 256), (64, 128, 128), (7, 7), (2, 2), (3, 3), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer1.0.conv1', 4, (64, 64, 64), (64, 64, 64), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer2.0.conv1', 1, (64, 64, 64), (128, 32, 32), (3, 3), (2, 2), (1, 1), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer2.0.conv2', 3, (128, 32, 32), (128, 32, 32), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer2.0.downsample.0', 1, (64, 64, 64), (128, 32, 32), (1, 1), (2, 2), (0, 0), (1, 1), 1, False, 'Down'),
    ('resnet18', 'layer3.0.conv1', 1, (128, 32, 32), (256, 16, 16), (3, 3), (2, 2), (1, 1), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer3.0.conv2', 3, (256, 16, 16), (256, 16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer3.0.downsample.0', 1, (128, 32, 32), (256, 16, 16), (1, 1), (2, 2), (0, 0), (1, 1), 1, False, 'Down'),
    ('resnet18', 'layer4.0.conv1', 1, (256, 16, 16), (512, 8, 8), (3, 3), (2, 2), (1, 1), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer4.0.conv2', 3, (512, 8, 8), (512, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('resnet18', 'layer4.0.downsample.0', 1, (256, 16, 16), (512, 8, 8), (1, 1), (2, 2), (0, 0), (1, 1), 1, False, 'Down'),
    ('resnext101', 'conv1', 1, (3, 256, 256), (64, 128, 128), (7, 7), (2, 2), (3, 3), (1, 1), 1, False, 'General'),
    ('resnext101', 'layer1.0.conv1', 2, (64, 64, 64), (256, 64, 64), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer1.0.conv2', 3, (256, 64, 64), (256, 64, 64), (3, 3), (1, 1), (1, 1), (1, 1), 32, False, 'General'),
    ('resnext101', 'layer1.0.conv3', 5, (256, 64, 64), (256, 64, 64), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer2.0.conv1', 1, (256, 64, 64), (512, 64, 64), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer2.0.conv2', 1, (512, 64, 64), (512, 32, 32), (3, 3), (2, 2), (1, 1), (1, 1), 32, False, 'General'),
    ('resnext101', 'layer2.0.conv3', 7, (512, 32, 32), (512, 32, 32), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer2.0.downsample.0', 1, (256, 64, 64), (512, 32, 32), (1, 1), (2, 2), (0, 0), (1, 1), 1, False, 'Down'),
    ('resnext101', 'layer2.1.conv2', 3, (512, 32, 32), (512, 32, 32), (3, 3), (1, 1), (1, 1), (1, 1), 32, False, 'General'),
    ('resnext101', 'layer3.0.conv1', 1, (512, 32, 32), (1024, 32, 32), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer3.0.conv2', 1, (1024, 32, 32), (1024, 16, 16), (3, 3), (2, 2), (1, 1), (1, 1), 32, False, 'General'),
    ('resnext101', 'layer3.0.conv3', 45, (1024, 16, 16), (1024, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer3.0.downsample.0', 1, (512, 32, 32), (1024, 16, 16), (1, 1), (2, 2), (0, 0), (1, 1), 1, False, 'Down'),
    ('resnext101', 'layer3.1.conv2', 22, (1024, 16, 16), (1024, 16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 32, False, 'General'),
    ('resnext101', 'layer4.0.conv1', 1, (1024, 16, 16), (2048, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer4.0.conv2', 1, (2048, 16, 16), (2048, 8, 8), (3, 3), (2, 2), (1, 1), (1, 1), 32, False, 'General'),
    ('resnext101', 'layer4.0.conv3', 5, (2048, 8, 8), (2048, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('resnext101', 'layer4.0.downsample.0', 1, (1024, 16, 16), (2048, 8, 8), (1, 1), (2, 2), (0, 0), (1, 1), 1, False, 'Down'),
    ('resnext101', 'layer4.1.conv2', 2, (2048, 8, 8), (2048, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 32, False, 'General'),
    ('convnext', 'features.0.0', 1, (3, 256, 256), (128, 64, 64), (4, 4), (4, 4), (0, 0), (1, 1), 1, True, 'Dense'),
    ('convnext', 'features.1.0.block.0', 3, (128, 64, 64), (128, 64, 64), (7, 7), (1, 1), (3, 3), (1, 1), 128, True, 'General'),
    ('convnext', 'features.2.1', 1, (128, 64, 64), (256, 32, 32), (2, 2), (2, 2), (0, 0), (1, 1), 1, True, 'Dense'),
    ('convnext', 'features.3.0.block.0', 3, (256, 32, 32), (256, 32, 32), (7, 7), (1, 1), (3, 3), (1, 1), 256, True, 'General'),
    ('convnext', 'features.4.1', 1, (256, 32, 32), (512, 16, 16), (2, 2), (2, 2), (0, 0), (1, 1), 1, True, 'Dense'),
    ('convnext', 'features.5.0.block.0', 27, (512, 16, 16), (512, 16, 16), (7, 7), (1, 1), (3, 3), (1, 1), 512, True, 'General'),
    ('convnext', 'features.6.1', 1, (512, 16, 16), (1024, 8, 8), (2, 2), (2, 2), (0, 0), (1, 1), 1, True, 'Dense'),
    ('convnext', 'features.7.0.block.0', 3, (1024, 8, 8), (1024, 8, 8), (7, 7), (1, 1), (3, 3), (1, 1), 1024, True, 'General'),
    ('inceptionv3', 'Conv2d.1a.3x3.conv', 1, (3, 299, 299), (32, 149, 149), (3, 3), (2, 2), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Conv2d.2a.3x3.conv', 1, (32, 149, 149), (32, 147, 147), (3, 3), (1, 1), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Conv2d.2b.3x3.conv', 1, (32, 147, 147), (64, 147, 147), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Conv2d.3b.1x1.conv', 1, (64, 73, 73), (80, 73, 73), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Conv2d.4a.3x3.conv', 1, (80, 73, 73), (192, 71, 71), (3, 3), (1, 1), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.5b.branch1x1.conv', 2, (192, 35, 35), (64, 35, 35), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.5b.branch5x5.1.conv', 1, (192, 35, 35), (48, 35, 35), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.5b.branch5x5.2.conv', 3, (48, 35, 35), (64, 35, 35), (5, 5), (1, 1), (2, 2), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.5b.branch3x3dbl.2.conv', 4, (64, 35, 35), (96, 35, 35), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.5b.branch3x3dbl.3.conv', 3, (96, 35, 35), (96, 35, 35), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.5b.branch.pool.conv', 1, (192, 35, 35), (32, 35, 35), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.5c.branch1x1.conv', 3, (256, 35, 35), (64, 35, 35), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.5c.branch5x5.1.conv', 1, (256, 35, 35), (48, 35, 35), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.5d.branch1x1.conv', 4, (288, 35, 35), (64, 35, 35), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.5d.branch5x5.1.conv', 1, (288, 35, 35), (48, 35, 35), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.6a.branch3x3.conv', 1, (288, 35, 35), (384, 17, 17), (3, 3), (2, 2), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.6a.branch3x3dbl.3.conv', 1, (96, 35, 35), (96, 17, 17), (3, 3), (2, 2), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.6b.branch1x1.conv', 12, (768, 17, 17), (192, 17, 17), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.6b.branch7x7.1.conv', 2, (768, 17, 17), (128, 17, 17), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.6b.branch7x7.2.conv', 2, (128, 17, 17), (128, 17, 17), (1, 7), (1, 1), (0, 3), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6b.branch7x7.3.conv', 1, (128, 17, 17), (192, 17, 17), (7, 1), (1, 1), (3, 0), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6b.branch7x7dbl.2.conv', 2, (128, 17, 17), (128, 17, 17), (7, 1), (1, 1), (3, 0), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6b.branch7x7dbl.5.conv', 1, (128, 17, 17), (192, 17, 17), (1, 7), (1, 1), (0, 3), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6c.branch7x7.1.conv', 4, (768, 17, 17), (160, 17, 17), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.6c.branch7x7.2.conv', 4, (160, 17, 17), (160, 17, 17), (1, 7), (1, 1), (0, 3), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6c.branch7x7.3.conv', 2, (160, 17, 17), (192, 17, 17), (7, 1), (1, 1), (3, 0), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6c.branch7x7dbl.2.conv', 4, (160, 17, 17), (160, 17, 17), (7, 1), (1, 1), (3, 0), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6c.branch7x7dbl.5.conv', 2, (160, 17, 17), (192, 17, 17), (1, 7), (1, 1), (0, 3), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6e.branch7x7.2.conv', 4, (192, 17, 17), (192, 17, 17), (1, 7), (1, 1), (0, 3), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.6e.branch7x7.3.conv', 4, (192, 17, 17), (192, 17, 17), (7, 1), (1, 1), (3, 0), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'AuxLogits.conv0.conv', 1, (768, 5, 5), (128, 5, 5), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'AuxLogits.conv1.conv', 1, (128, 5, 5), (768, 1, 1), (5, 5), (1, 1), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.7a.branch3x3.2.conv', 1, (192, 17, 17), (320, 8, 8), (3, 3), (2, 2), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.7a.branch7x7x3.4.conv', 1, (192, 17, 17), (192, 8, 8), (3, 3), (2, 2), (0, 0), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.7b.branch1x1.conv', 1, (1280, 8, 8), (320, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.7b.branch3x3.1.conv', 1, (1280, 8, 8), (384, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.7b.branch3x3.2a.conv', 4, (384, 8, 8), (384, 8, 8), (1, 3), (1, 1), (0, 1), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.7b.branch3x3.2b.conv', 4, (384, 8, 8), (384, 8, 8), (3, 1), (1, 1), (1, 0), (1, 1), 1, False, 'Dense mix'),
    ('inceptionv3', 'Mixed.7b.branch3x3dbl.1.conv', 1, (1280, 8, 8), (448, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.7b.branch3x3dbl.2.conv', 2, (448, 8, 8), (384, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, 'General'),
    ('inceptionv3', 'Mixed.7b.branch.pool.conv', 1, (1280, 8, 8), (192, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.7c.branch1x1.conv', 1, (2048, 8, 8), (320, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.7c.branch3x3.1.conv', 1, (2048, 8, 8), (384, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.7c.branch3x3dbl.1.conv', 1, (2048, 8, 8), (448, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('inceptionv3', 'Mixed.7c.branch.pool.conv', 1, (2048, 8, 8), (192, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.0.0', 1, (3, 256, 256), (32, 128, 128), (3, 3), (2, 2), (1, 1), (1, 1), 1, False, 'General'),
    ('mobilenetv2', 'features.1.conv.0.0', 1, (32, 128, 128), (32, 128, 128), (3, 3), (1, 1), (1, 1), (1, 1), 32, False, 'General'),
    ('mobilenetv2', 'features.1.conv.1', 1, (32, 128, 128), (16, 128, 128), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.2.conv.0.0', 1, (16, 128, 128), (96, 128, 128), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.2.conv.1.0', 1, (96, 128, 128), (96, 64, 64), (3, 3), (2, 2), (1, 1), (1, 1), 96, False, 'General'),
    ('mobilenetv2', 'features.2.conv.2', 1, (96, 64, 64), (24, 64, 64), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.3.conv.0.0', 2, (24, 64, 64), (144, 64, 64), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.3.conv.1.0', 1, (144, 64, 64), (144, 64, 64), (3, 3), (1, 1), (1, 1), (1, 1), 144, False, 'General'),
    ('mobilenetv2', 'features.3.conv.2', 1, (144, 64, 64), (24, 64, 64), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.4.conv.1.0', 1, (144, 64, 64), (144, 32, 32), (3, 3), (2, 2), (1, 1), (1, 1), 144, False, 'General'),
    ('mobilenetv2', 'features.4.conv.2', 1, (144, 32, 32), (32, 32, 32), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.5.conv.0.0', 3, (32, 32, 32), (192, 32, 32), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.5.conv.1.0', 2, (192, 32, 32), (192, 32, 32), (3, 3), (1, 1), (1, 1), (1, 1), 192, False, 'General'),
    ('mobilenetv2', 'features.5.conv.2', 2, (192, 32, 32), (32, 32, 32), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.7.conv.1.0', 1, (192, 32, 32), (192, 16, 16), (3, 3), (2, 2), (1, 1), (1, 1), 192, False, 'General'),
    ('mobilenetv2', 'features.7.conv.2', 1, (192, 16, 16), (64, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.8.conv.0.0', 4, (64, 16, 16), (384, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.8.conv.1.0', 4, (384, 16, 16), (384, 16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 384, False, 'General'),
    ('mobilenetv2', 'features.8.conv.2', 3, (384, 16, 16), (64, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.11.conv.2', 1, (384, 16, 16), (96, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.12.conv.0.0', 3, (96, 16, 16), (576, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.12.conv.1.0', 2, (576, 16, 16), (576, 16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 576, False, 'General'),
    ('mobilenetv2', 'features.12.conv.2', 2, (576, 16, 16), (96, 16, 16), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.14.conv.1.0', 1, (576, 16, 16), (576, 8, 8), (3, 3), (2, 2), (1, 1), (1, 1), 576, False, 'General'),
    ('mobilenetv2', 'features.14.conv.2', 1, (576, 8, 8), (160, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.15.conv.0.0', 3, (160, 8, 8), (960, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.15.conv.1.0', 3, (960, 8, 8), (960, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 960, False, 'General'),
    ('mobilenetv2', 'features.15.conv.2', 2, (960, 8, 8), (160, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.17.conv.2', 1, (960, 8, 8), (320, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
    ('mobilenetv2', 'features.18.0', 1, (320, 8, 8), (1280, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, 'Dense'),
]

LAYERS: List[ConvLayer] = [ConvLayer(*row) for row in ROWS]

#: (net, name in Table E3) -> layer name in shared/anchors/anchor_ops.jsonl (66 layers)
ANCHOR_NAMES = {
    ('3c3d', 'conv1.0'): 'conv1.0',
    ('3c3d', 'conv2.0'): 'conv2.0',
    ('3c3d', 'conv3.1'): 'conv3.1',
    ('2c2d', 'conv1.1'): 'conv1.1',
    ('2c2d', 'conv2.1'): 'conv2.1',
    ('allcnnc', 'conv1.1'): 'conv1.1',
    ('allcnnc', 'conv2.1'): 'conv2.1',
    ('allcnnc', 'conv3.1'): 'conv3.1',
    ('allcnnc', 'conv4.1'): 'conv4.1',
    ('allcnnc', 'conv5.1'): 'conv5.1',
    ('allcnnc', 'conv6.1'): 'conv6.1',
    ('allcnnc', 'conv7.0'): 'conv7.0',
    ('allcnnc', 'conv8.1'): 'conv8.1',
    ('allcnnc', 'conv9.1'): 'conv9.1',
    ('alexnet', 'features.0'): 'features.0',
    ('alexnet', 'features.3'): 'features.3',
    ('alexnet', 'features.6'): 'features.6',
    ('alexnet', 'features.8'): 'features.8',
    ('alexnet', 'features.10'): 'features.10',
    ('resnet18', 'conv1'): 'conv1',
    ('resnet18', 'layer1.0.conv1'): 'layer1.0.conv1',
    ('resnet18', 'layer2.0.conv1'): 'layer2.0.conv1',
    ('resnet18', 'layer2.0.conv2'): 'layer2.0.conv2',
    ('resnet18', 'layer2.0.downsample.0'): 'layer2.0.downsample.0',
    ('resnet18', 'layer3.0.conv1'): 'layer3.0.conv1',
    ('resnet18', 'layer3.0.conv2'): 'layer3.0.conv2',
    ('resnet18', 'layer3.0.downsample.0'): 'layer3.0.downsample.0',
    ('resnet18', 'layer4.0.conv1'): 'layer4.0.conv1',
    ('resnet18', 'layer4.0.conv2'): 'layer4.0.conv2',
    ('resnet18', 'layer4.0.downsample.0'): 'layer4.0.downsample.0',
    ('resnext101', 'layer1.0.conv1'): 'layer1.0.conv1',
    ('resnext101', 'layer1.0.conv2'): 'layer1.0.conv2',
    ('resnext101', 'layer2.0.conv2'): 'layer2.0.conv2',
    ('resnext101', 'layer2.0.conv3'): 'layer2.0.conv3',
    ('resnext101', 'layer2.0.downsample.0'): 'layer2.0.downsample.0',
    ('resnext101', 'layer2.1.conv2'): 'layer2.1.conv2',
    ('resnext101', 'layer3.0.conv2'): 'layer3.0.conv2',
    ('resnext101', 'layer3.0.conv3'): 'layer3.0.conv3',
    ('resnext101', 'layer3.1.conv2'): 'layer3.1.conv2',
    ('resnext101', 'layer4.0.conv2'): 'layer4.0.conv2',
    ('resnext101', 'layer4.1.conv2'): 'layer4.1.conv2',
    ('convnext', 'features.0.0'): 'features.0.0',
    ('convnext', 'features.1.0.block.0'): 'features.1.0.block.0',
    ('convnext', 'features.2.1'): 'features.2.1',
    ('convnext', 'features.3.0.block.0'): 'features.3.0.block.0',
    ('convnext', 'features.5.0.block.0'): 'features.5.0.block.0',
    ('convnext', 'features.7.0.block.0'): 'features.7.0.block.0',
    ('inceptionv3', 'Conv2d.1a.3x3.conv'): 'Conv2d_1a_3x3',
    ('inceptionv3', 'Conv2d.2a.3x3.conv'): 'Conv2d_2a_3x3',
    ('inceptionv3', 'Conv2d.2b.3x3.conv'): 'Conv2d_2b_3x3',
    ('inceptionv3', 'Conv2d.3b.1x1.conv'): 'Conv2d_3b_1x1',
    ('inceptionv3', 'Conv2d.4a.3x3.conv'): 'Conv2d_4a_3x3',
    ('inceptionv3', 'Mixed.5b.branch5x5.2.conv'): 'Mixed_5b.branch5x5_2',
    ('inceptionv3', 'Mixed.6b.branch7x7.2.conv'): 'Mixed_6b.branch7x7_2',
    ('inceptionv3', 'Mixed.6b.branch7x7.3.conv'): 'Mixed_6b.branch7x7_3',
    ('inceptionv3', 'Mixed.7b.branch3x3.2a.conv'): 'Mixed_7b.branch3x3_2a',
    ('inceptionv3', 'Mixed.7c.branch1x1.conv'): 'Mixed_7c.branch1x1',
    ('mobilenetv2', 'features.0.0'): 'features.0.0',
    ('mobilenetv2', 'features.1.conv.0.0'): 'features.1.conv.0.0',
    ('mobilenetv2', 'features.2.conv.0.0'): 'features.2.conv.0.0',
    ('mobilenetv2', 'features.2.conv.1.0'): 'features.2.conv.1.0',
    ('mobilenetv2', 'features.3.conv.1.0'): 'features.3.conv.1.0',
    ('mobilenetv2', 'features.5.conv.0.0'): 'features.5.conv.0.0',
    ('mobilenetv2', 'features.8.conv.1.0'): 'features.8.conv.1.0',
    ('mobilenetv2', 'features.15.conv.1.0'): 'features.15.conv.1.0',
    ('mobilenetv2', 'features.18.0'): 'features.18.0',
}

ANCHOR_LAYERS: List[ConvLayer] = [layer for layer in LAYERS if layer.key in ANCHOR_NAMES]


def layers(nets=None, subset: str = "anchors") -> List[ConvLayer]:
    """Layers to benchmark: ``subset="anchors"`` (the 66 of the anchors) or ``"all"`` (all 132 rows).

    ``nets``: optional iterable of net keys (see :data:`NETS`) to keep.
    """
    if subset not in ("anchors", "all"):
        raise ValueError(f"subset must be 'anchors' or 'all', got {subset!r}")
    chosen = ANCHOR_LAYERS if subset == "anchors" else LAYERS
    if nets is not None:
        nets = list(nets)
        unknown = sorted(set(nets) - set(NETS))
        if unknown:
            raise ValueError(f"unknown nets {unknown}; known: {NETS}")
        chosen = [layer for layer in chosen if layer.net in nets]
    return chosen

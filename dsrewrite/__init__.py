"""dsrewrite: swap dense k×k convolutions in a trained PyTorch model for depthwise-separable ones.

Example:
    >>> from torch import nn
    >>> from dsrewrite import DepthwiseSeparableConv2d
    >>> DepthwiseSeparableConv2d.from_conv(nn.Conv2d(32, 64, 3, bias=False)).pointwise.weight.shape
    torch.Size([64, 32, 1, 1])
"""

from .errors import DsRewriteError
from .layers import DepthwiseSeparableConv2d

__version__ = "0.1.0"

__all__ = ["DepthwiseSeparableConv2d", "DsRewriteError", "__version__"]

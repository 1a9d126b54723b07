"""Facts about each convolution call site, as captured from a model's graph.

:class:`ConvFact` is the record a recipe is matched against; :class:`Capture`
bundles the facts of one model with how its graph was captured. They are
computed by :func:`dsrewrite.capture.capture`.

Example:
    >>> f = ConvFact(name="decoder.0", cls="torch.nn.modules.conv.Conv2d", conv_type="Conv2d",
    ...              plain=True, in_channels=64, out_channels=32, kernel_size=(3, 3), stride=(1, 1),
    ...              padding=(1, 1), dilation=(1, 1), groups=1, bias=False, padding_mode="zeros",
    ...              dtype="float32", device="cpu", region="decoder", calls=1)
    >>> f.shared, f.region
    (False, 'decoder')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union

__all__ = ["ConvFact", "Capture", "CaptureMethod", "PREDICATES"]

CaptureMethod = Literal["fx", "export", "names"]

#: Graph predicates; ``None`` on a fact means "unknown" (name-only capture).
PREDICATES: tuple[str, ...] = ("after_concat", "after_upsample", "downstream_of_upsample")


@dataclass(frozen=True)
class ConvFact:
    """One convolution module and what the graph says about it.

    ``name`` is the module's qualified name (as in ``model.named_modules()``);
    ``region`` its first component. ``calls`` counts how often the module ran on
    the example input (``> 1``: shared). Shapes are those of the first call.
    ``output_stride`` is the model input's height divided by this conv's output
    height (``1`` at full resolution, ``32`` deep in a ResNet). ``plain`` is
    False for a subclass whose forward differs from torch's own class (timm's
    ``Conv2dSame``, ``StdConv2d``). Predicates are ``None`` when unknown.
    """

    name: str
    cls: str
    conv_type: str
    plain: bool
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Union[tuple[int, ...], str]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    dtype: str
    device: str
    region: str
    calls: int
    input_shape: Optional[tuple[int, ...]] = None
    output_shape: Optional[tuple[int, ...]] = None
    output_stride: Optional[float] = None
    after_concat: Optional[bool] = None
    after_upsample: Optional[bool] = None
    downstream_of_upsample: Optional[bool] = None

    @property
    def shared(self) -> bool:
        """True when one module is called more than once."""
        return self.calls > 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["shared"] = self.shared
        return d


@dataclass(frozen=True)
class Capture:
    """The facts of one model, and how they were obtained.

    ``method`` is ``"fx"`` (``torch.fx.symbolic_trace``), ``"export"``
    (``torch.export.export(strict=False)``) or ``"names"`` (both failed: only
    module names and hyperparameters are known, graph predicates are ``None``).
    ``functional_convs`` names convolution calls that belong to no conv module
    (``F.conv2d`` inside a custom module): they cannot be replaced.
    ``notes`` say why a capture fell back, in words a user can act on.
    """

    method: CaptureMethod
    facts: tuple[ConvFact, ...]
    input_shape: Optional[tuple[int, ...]] = None
    functional_convs: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def by_name(self) -> dict[str, ConvFact]:
        return {f.name: f for f in self.facts}

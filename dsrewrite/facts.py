# SPDX-License-Identifier: Apache-2.0
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
    >>> f.after_concat is None, f.predicates["after_upsample"] is None
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Optional, Union

from .predicates import predicate_names

__all__ = ["ConvFact", "Capture", "CaptureMethod", "PredicateValues", "PREDICATES"]

CaptureMethod = Literal["fx", "export", "names"]


def __getattr__(name: str) -> Any:
    if name == "PREDICATES":  # the registered graph predicates, read on access
        return predicate_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PredicateValues(Mapping[str, Optional[bool]]):
    """A conv's graph predicates: name → ``True``/``False``/``None`` (unknown), read-only and hashable.

    Every registered predicate has a value (``None`` when not given); the order is the
    registry's, then any other names given.

    Example:
        >>> v = PredicateValues({"after_concat": True})
        >>> v["after_concat"], v["after_upsample"], len(v) == len(predicate_names())
        (True, None, True)
    """

    __slots__ = ("_items",)

    def __init__(self, values: Optional[Mapping[str, Optional[bool]]] = None) -> None:
        given = dict(values or {})
        names = [*predicate_names(), *(k for k in given if k not in predicate_names())]
        self._items: tuple[tuple[str, Optional[bool]], ...] = tuple((k, given.get(k)) for k in names)

    def __getitem__(self, key: str) -> Optional[bool]:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return f"PredicateValues({dict(self)!r})"

    def __reduce__(self) -> Any:
        return (PredicateValues, (dict(self),))


@dataclass(frozen=True)
class ConvFact:
    """One convolution module and what the graph says about it.

    ``name`` is the module's qualified name (as in ``model.named_modules()``);
    ``region`` its first component. ``calls`` counts how often the module ran on
    the example input (``> 1``: shared). Shapes are those of the first call.
    ``output_stride`` is the model input's height divided by this conv's output
    height (``1`` at full resolution, ``32`` deep in a ResNet; the length for 1-d
    convs on 1-d inputs, the height H of ``(N, C, D, H, W)`` for 3-d ones). ``plain`` is
    False for a subclass whose forward differs from torch's own class (timm's
    ``Conv2dSame``, ``StdConv2d``). ``predicates`` maps each registered graph
    predicate (:mod:`dsrewrite.predicates`) to its value, ``None`` when unknown; each
    is also readable as an attribute (``fact.after_concat``) and may be given as a
    keyword argument (``ConvFact(..., after_concat=True)``).
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
    predicates: PredicateValues = field(default_factory=PredicateValues)

    def __init__(self, **values: Any) -> None:
        preds = dict(values.pop("predicates", None) or {})
        own = {f.name for f in fields(ConvFact)}
        for key in [k for k in values if k not in own]:
            if key not in predicate_names():
                raise TypeError(f"ConvFact() got an unexpected keyword argument {key!r} "
                                f"(graph predicates: {', '.join(predicate_names())})")
            preds[key] = values.pop(key)
        for f in fields(ConvFact):
            if f.name == "predicates":
                continue
            if f.name in values:
                value = values.pop(f.name)
            elif f.default is not MISSING:
                value = f.default
            else:
                raise TypeError(f"ConvFact() missing required keyword argument {f.name!r}")
            object.__setattr__(self, f.name, value)
        object.__setattr__(self, "predicates", PredicateValues(preds))

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a graph predicate read as an attribute
        if not name.startswith("_") and name != "predicates":
            try:
                preds = object.__getattribute__(self, "predicates")
            except AttributeError:
                preds = None
            if preds is not None and name in preds:
                return preds[name]
            if name in predicate_names():
                return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def shared(self) -> bool:
        """True when one module is called more than once."""
        return self.calls > 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "predicates"}
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d.update(self.predicates)
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
    ``verification`` says, in one line, which capture was used and why the others were
    rejected (each graph is run on the example inputs and compared with eager).
    """

    method: CaptureMethod
    facts: tuple[ConvFact, ...]
    input_shape: Optional[tuple[int, ...]] = None
    functional_convs: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    verification: str = ""

    def by_name(self) -> dict[str, ConvFact]:
        return {f.name: f for f in self.facts}

# SPDX-License-Identifier: Apache-2.0
"""Load a state dict into an architecture without a second copy of the weights, when that is safe.

Today's way (:func:`~dsrewrite.io.state_dict.fit_state_dict`) builds the architecture with
random weights and copies the loaded state dict into it: for a moment the process holds the
model twice (the file's tensors and the built parameters). :func:`fit_on_meta` builds the
architecture on the meta device (shapes, no storage) and hands the loaded tensors to it
(``load_state_dict(assign=True)``), so the parameters *are* the loaded tensors.

It does so only when the result is the model the copying path would give, and returns
``None`` (the caller then takes the copying path) when it cannot be sure:

* building on meta fails (a factory reads values: ``.item()``, ``tolist()``), or puts any
  parameter or buffer elsewhere than on meta;
* building would import a module: the library (or the factory's module) is imported first,
  outside the meta context, and any further import while building on meta is refused, so that
  no module's import-time tensors are made on meta (the copying path then imports it);
* the architecture ties parameters or buffers (one tensor under two names; assigning would untie them);
* the state dict does not fit the architecture as it is or with a wrapper prefix stripped (the
  copying path then gives today's error, or loads a rewritten model by its plan sidecar);
* a loaded tensor is not a plain dense tensor (quantized, a subclass, on meta);
* after assigning, anything is still on meta: a parameter, a buffer, or a tensor attribute
  (non-persistent buffers computed at construction, e.g. timm's relative position index or
  anti-aliasing filters, are not in the state dict, nor is a ``weight_norm`` weight);
* ``load_state_dict`` raises, or any parameter or buffer differs from the architecture's in
  shape, dtype, device or ``requires_grad``.

A loaded tensor is used as it is only when it has the architecture's dtype, strides and device
and owns its storage alone; otherwise it is copied into a new tensor laid out as the
architecture's (what ``load_state_dict``'s copy gives: the architecture's dtype wins).

Visible differences: building on meta draws no random numbers, so torch's global generator is
not advanced by the architecture's initialisation (dsrewrite itself seeds its own generators);
where the meta path falls back after building, the factory runs twice (once on meta); while
building on meta, imports not yet done are refused process-wide (``sys.meta_path``), so another
thread importing at that moment would fail.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.io.arch import arch_spec
    >>> sd = {k: v.clone() for k, v in nn.Linear(2, 3).state_dict().items()}
    >>> model, note = fit_on_meta(arch_spec("torch.nn:Linear", {"in_features": 2, "out_features": 3}), sd,
    ...                           source="x.pt")
    >>> model.weight.data_ptr() == sd["weight"].data_ptr(), model.weight.requires_grad
    (True, True)
    >>> fit_on_meta(arch_spec("torch.nn:Identity"), sd, source="x.pt") is None  # does not fit: copying path says why
    True
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from ..errors import ModelLoadError
from .arch import ArchSpec, build_arch, import_arch_module
from .state_dict import select_state_dict

__all__ = ["fit_on_meta", "meta_leftovers"]


def _tensors_in(value: Any, depth: int = 2) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 0 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth - 1)


def meta_leftovers(model: nn.Module) -> list[str]:
    """Names of the parameters, buffers and tensor attributes of ``model`` still on the meta device.

    Tensor attributes are looked for in each module's ``__dict__`` and in lists, tuples and
    dicts held there (two levels).

    Example:
        >>> with torch.device("meta"):
        ...     m = nn.Linear(2, 3)
        >>> m.register_buffer("idx", torch.arange(3), persistent=False)
        >>> meta_leftovers(m)
        ['weight', 'bias']
    """
    out = []
    for mname, module in model.named_modules(remove_duplicate=False):
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                out += [f"{mname}.{k}".lstrip(".") for k, t in value.items() if t is not None and t.is_meta]
            elif key != "_modules" and any(t.is_meta for t in _tensors_in(value)):
                out.append(f"{mname}.{key}".lstrip("."))
    return list(dict.fromkeys(out))


def _tied(model: nn.Module) -> bool:
    for named in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        seen: set[int] = set()
        for _, t in named:
            if id(t) in seen:
                return True
            seen.add(id(t))
    return False


def _own_storage(t: torch.Tensor) -> bool:
    return t.numel() > 0 and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _as_architecture(cand: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                     device: torch.device) -> Optional[dict[str, torch.Tensor]]:
    """``cand``'s tensors, each as is or copied into the architecture's layout; None if one is odd."""
    if any(type(v) not in (torch.Tensor, nn.Parameter) or v.is_meta or v.is_quantized or v.layout != torch.strided
           or v.is_conj() or v.is_neg() for v in cand.values()):
        return None
    ptrs: dict[int, int] = {}
    for v in cand.values():
        if v.numel():
            p = v.untyped_storage().data_ptr()
            ptrs[p] = ptrs.get(p, 0) + 1
    out = {}
    for k, v in cand.items():
        ref = own[k]
        if (v.dtype == ref.dtype and v.device == device and v.stride() == ref.stride() and _own_storage(v)
                and ptrs[v.untyped_storage().data_ptr()] == 1):
            out[k] = v.detach()
        else:
            with torch.no_grad():
                out[k] = torch.empty_strided(ref.shape, ref.stride(), dtype=ref.dtype, device=device).copy_(v)
    return out


class _NoImports:
    """A ``sys.meta_path`` finder that refuses every import not yet done, and remembers that one was tried."""

    tried: Optional[str] = None

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        self.tried = self.tried or name
        raise ImportError(f"dsrewrite: no import while building on the meta device ({name})")


def _signature(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    sig: dict[str, tuple[Any, ...]] = {}
    for name, p in model.named_parameters():
        sig["p:" + name] = (tuple(p.shape), p.dtype, p.requires_grad)
    for name, b in model.named_buffers():
        sig["b:" + name] = (tuple(b.shape), b.dtype, b.requires_grad)
    return sig


def fit_on_meta(arch: ArchSpec, sd: Mapping[str, torch.Tensor], *,
                source: str) -> Optional[tuple[nn.Module, str]]:
    """Build ``arch`` on the meta device and assign ``sd``'s tensors to it; None where that is not safe.

    Returns the model (on torch's default device, in the architecture's dtypes) and the note of
    :func:`~dsrewrite.io.state_dict.select_state_dict` (a stripped prefix), or None: then the
    caller builds the architecture normally and copies (its errors and messages are today's).
    Warnings the factory gave while building are given again when the meta path is taken.
    """
    device = torch.get_default_device()
    if device.type == "meta":
        return None
    blocker = _NoImports()
    try:
        import_arch_module(arch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sys.meta_path.insert(0, blocker)
            try:
                with torch.device("meta"):
                    model = build_arch(arch)
            finally:
                sys.meta_path.remove(blocker)
    except Exception:  # ModelLoadError included: the copying path builds again and says it
        return None
    if blocker.tried is not None:  # even if the factory caught the ImportError and built something else
        return None
    if any(not t.is_meta for t in (*model.parameters(), *model.buffers())) or _tied(model):
        return None
    before = _signature(model)
    try:
        cand, note = select_state_dict(model, sd, source=source, arch=str(arch))
    except ModelLoadError:
        return None
    own = model.state_dict()
    tensors = _as_architecture(cand, own, device)
    if tensors is None:
        return None
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except Exception:
        return None
    del tensors, cand, own
    if meta_leftovers(model) or _signature(model) != before or _tied(model) or any(
            t.device != device for t in (*model.parameters(), *model.buffers())):
        return None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return model, note

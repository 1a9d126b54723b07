# SPDX-License-Identifier: Apache-2.0
"""Checkpoint state dicts: finding one in a checkpoint and fitting it to an architecture.

The containers training tools write (timm ``train.py``, Lightning, EMA copies) and the
wrapper prefixes they add to every key (DataParallel/DDP ``module.``, torch.compile
``_orig_mod.``, Lightning ``model.``/``net.``): a prefix is stripped only when the stripped
keys and shapes equal the architecture's, and a refusal says which prefix it saw.

Example:
    >>> from torch import nn
    >>> sd = {f"module.{k}": v for k, v in nn.Linear(2, 3).state_dict().items()}
    >>> fit_state_dict(nn.Linear(2, 3), sd, source="ck.pt", arch="lin")
    "stripped 'module.' prefix"
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..errors import ModelLoadError, did_you_mean

__all__ = ["STATE_DICT_KEYS", "WRAPPER_PREFIXES", "extract_state_dict", "fit_state_dict",
           "load_state_dict_checked", "is_tensor_mapping", "select_state_dict"]

#: Keys under which a checkpoint dict may hold the state dict (searched in this order).
STATE_DICT_KEYS: tuple[str, ...] = (
    "state_dict", "model_state_dict", "model", "net", "module", "state_dict_ema", "model_ema", "ema",
)
#: Prefixes training wrappers add to every key: DataParallel/DDP, torch.compile, Lightning modules.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "model.", "net.")


def is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, *, source: str = "<object>",
                       state_dict_key: Optional[str] = None) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a checkpoint object; say where it was.

    A dict of tensors is the state dict itself; otherwise the first of
    :data:`STATE_DICT_KEYS` that holds one (timm ``train.py``: ``state_dict`` and
    ``state_dict_ema``; Lightning: ``state_dict``; others ``model``, ``net``, ``ema`` ...),
    or ``state_dict_key`` when given (CLI ``--state-dict-key``). Wrapper prefixes are
    left in place: :func:`fit_state_dict` strips them once it knows the architecture.

    Raises:
        ModelLoadError: no state dict found, or ``state_dict_key`` absent (with did-you-mean).

    Example:
        >>> sd, where = extract_state_dict({"state_dict": {"module.w": torch.ones(1)}, "epoch": 3})
        >>> list(sd), where
        (['module.w'], "key 'state_dict'")
    """
    candidates = [k for k, v in obj.items() if isinstance(k, str) and is_tensor_mapping(v)] \
        if isinstance(obj, Mapping) and not is_tensor_mapping(obj) else []
    if state_dict_key is not None:
        if not isinstance(obj, Mapping) or state_dict_key not in obj or not is_tensor_mapping(obj[state_dict_key]):
            held = ", ".join(map(repr, candidates)) or "none"
            raise ModelLoadError(
                f"{source} has no state dict under key {state_dict_key!r}"
                f"{did_you_mean(state_dict_key, candidates)}; keys holding state dicts: {held}."
            )
        return dict(obj[state_dict_key]), f"key {state_dict_key!r}"
    if is_tensor_mapping(obj):
        return dict(obj), ""
    found = next((k for k in STATE_DICT_KEYS if k in candidates), None)
    if found is None and len(candidates) == 1:
        found = candidates[0]
    if found is None:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        more = f" Several keys hold state dicts ({', '.join(map(repr, candidates))}): pick one with " \
               "--state-dict-key." if candidates else ""
        raise ModelLoadError(
            f"{source} holds {what}, not a model or a state dict: expected torch.save(model), a dict of "
            f"tensors, or a checkpoint with one under {', '.join(map(repr, STATE_DICT_KEYS))}.{more}"
        )
    others = [k for k in candidates if k != found]
    note = f"key {found!r}" + (f" (also in the file: {', '.join(map(repr, others))}; choose with "
                               "--state-dict-key)" if others else "")
    return dict(obj[found]), note


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … (+{len(keys) - n})" if len(keys) > n else "")


def _mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    return missing, unexpected, mismatched


def _describe_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> str:
    missing, unexpected, mismatched = _mismatch(own, sd)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if mismatched:
        shown = [f"{k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in mismatched]
        parts.append(f"{len(mismatched)} shape mismatch{'es' if len(mismatched) > 1 else ''} ({_few(shown, 3)})")
    return ", ".join(parts)


def _prefix_candidates(sd: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor], int]]:
    """(prefix, keys with it stripped, keys dropped) for every chain of wrapper prefixes the keys carry."""
    out: list[tuple[str, dict[str, torch.Tensor], int]] = [("", dict(sd), 0)]
    todo = [("", dict(sd))]
    while todo:
        prefix, cur = todo.pop(0)
        for p in WRAPPER_PREFIXES:
            sub = {k[len(p):]: v for k, v in cur.items() if k.startswith(p)}
            if not sub:
                continue
            full = prefix + p
            if all(full != c[0] for c in out):
                out.append((full, sub, len(sd) - len(sub)))
                todo.append((full, sub))
    return out


def _common_prefix(keys: list[str]) -> str:
    """The dotted components every key starts with (``"model.backbone."``), ``""`` if none."""
    if not keys:
        return ""
    parts = [k.split(".")[:-1] for k in keys]
    out: list[str] = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        out.append(group[0])
    return "".join(p + "." for p in out)


def fit_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, arch: str) -> str:
    """Load ``sd`` into ``model`` (strict), stripping a wrapper prefix only if that makes it fit exactly.

    Prefixes tried: chains of :data:`WRAPPER_PREFIXES` (``module.`` from DataParallel/DDP,
    ``_orig_mod.`` from torch.compile, ``model.``/``net.`` from Lightning modules), on all
    keys or, for a Lightning module that holds more than the network (a loss with buffers),
    on the keys that carry it (the others are dropped and the note says how many). A
    prefix is used only when the stripped keys and shapes equal the architecture's.
    Returns a note for the report (``""`` when the keys fit as they are).

    Raises:
        ModelLoadError: nothing fits; the message names the keys, shapes and the prefix seen.

    Example:
        >>> m = nn.Linear(2, 3)
        >>> sd = {f"model._orig_mod.{k}": v for k, v in m.state_dict().items()}
        >>> fit_state_dict(nn.Linear(2, 3), sd, source="ck.pt", arch="lin")
        "stripped 'model._orig_mod.' prefix"
    """
    cand, note = select_state_dict(model, sd, source=source, arch=arch)
    try:
        model.load_state_dict(cand, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"state dict in {source} does not load into arch {arch!r}: {exc}") from exc
    return note


def select_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str,
                      arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """The keys of ``sd`` that fit ``model`` exactly (a wrapper prefix stripped if needed), and the note.

    What :func:`fit_state_dict` loads, without loading it (``model`` may be on the meta device).

    Raises:
        ModelLoadError: nothing fits (the message :func:`fit_state_dict` gives).

    Example:
        >>> cand, note = select_state_dict(nn.Linear(2, 3), {"module.bias": torch.ones(3), "module.weight":
        ...                                torch.ones(3, 2)}, source="ck.pt", arch="lin")
        >>> sorted(cand), note
        (['bias', 'weight'], "stripped 'module.' prefix")
    """
    own = model.state_dict()
    own_shapes = {k: tuple(v.shape) for k, v in own.items()}
    chosen = None
    for prefix, cand, dropped in _prefix_candidates(sd):
        if {k: tuple(v.shape) for k, v in cand.items()} == own_shapes:
            chosen = (prefix, cand, dropped)
            break
    if chosen is None:
        cands = _prefix_candidates(sd)
        best = max(cands, key=lambda c: (sum(k in own for k in c[1]), -c[2]))
        common = _common_prefix(list(sd))
        wrapper = ""
        while any(common[len(wrapper):].startswith(p) for p in WRAPPER_PREFIXES):
            wrapper += next(p for p in WRAPPER_PREFIXES if common[len(wrapper):].startswith(p))
        rest = common[len(wrapper):].split(".", 1)[0] + "." if common[len(wrapper):] else ""
        if best[0]:
            hint = (f"the keys carry prefix {best[0]!r}; with it stripped: {_describe_mismatch(own, best[1])}. "
                    "Check that --arch names the architecture (and head size) the checkpoint was saved from.")
        elif rest and rest.rstrip(".") not in {k.split(".", 1)[0] for k in own}:
            why = (f"{wrapper!r} is a wrapper prefix dsrewrite strips, but {rest!r} is not a part of arch {arch!r}"
                   if wrapper else f"which is neither a part of arch {arch!r} nor a wrapper prefix dsrewrite strips "
                   f"({', '.join(WRAPPER_PREFIXES)})")
            hint = (f"Every key starts with {wrapper + rest!r}{': ' if wrapper else ', '}{why}. Check --arch, or "
                    f"re-save the state dict of the network itself (here: of the attribute {rest.rstrip('.')!r}).")
        else:
            hint = "Check that --arch names the architecture (and head size) the checkpoint was saved from."
        raise ModelLoadError(
            f"state dict in {source} does not fit arch {arch!r}: {_describe_mismatch(own, sd)}. {hint}"
        )
    prefix, cand, dropped = chosen
    if not prefix:
        return cand, ""
    return cand, f"stripped {prefix!r} prefix" + (f", dropped {dropped} keys without it" if dropped else "")


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, arch: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with a clear error naming keys and shapes (no prefix handling).

    Example:
        >>> load_state_dict_checked(nn.Linear(2, 3), {"weight": torch.ones(3, 3)}, source="x.pt", arch="lin")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: state dict in x.pt does not fit arch 'lin': 1 missing (bias), 1 shape mismatch (weight: file [3, 3] vs model [3, 2]). Check that --arch names the architecture (and head size) the checkpoint was saved from.
    """
    own = model.state_dict()
    if any(_mismatch(own, sd)):
        raise ModelLoadError(
            f"state dict in {source} does not fit arch {arch!r}: {_describe_mismatch(own, sd)}. Check that --arch "
            "names the architecture (and head size) the checkpoint was saved from."
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"state dict in {source} does not load into arch {arch!r}: {exc}") from exc



"""The zoo sweep: run dsrewrite over torchvision, timm and smp models and tabulate what happens.

For every model (random weights, nothing downloaded) the sweep

1. builds it under ``torch.manual_seed(0)`` in ``eval()``, sets zero-initialised gains to 1
   (:func:`wake_up`), picks the smallest square input side from its candidate list on which
   it runs (seeded ``1×3×s×s``), and re-estimates BatchNorm statistics on a seeded random
   batch (:func:`recalibrate_bn`): without the last two steps some replaced convs would not
   reach the outputs of a random-weight model and the checks below would say nothing;
2. captures it once (``dsrewrite.capture``) and plans the built-in recipes ``all_3x3`` and
   ``decoder_only`` from that capture (``dsrewrite.planner.plan_from_capture``, what
   ``dsrewrite.planner.plan`` does after capturing); a ``NothingSelectedWarning`` is recorded,
   not an error. Every plan entry must carry a reason, every conv with its own forward must be
   skipped saying so, and every functional convolution (``Capture.functional_convs``:
   ``F.conv2d`` outside any conv module, e.g. timm ``CondConv2d``) must be named as not
   replaceable in the plan notes;
3. applies each plan (``dsrewrite.apply.apply_plan``): the model's own class must come back,
   with exactly the planned ``DepthwiseSeparableConv2d`` blocks, none of them in place of a conv
   whose forward differs from ``nn.Conv2d`` (:func:`own_forward`, checked independently of
   dsrewrite: timm ``Conv2dSame``, ``StdConv2d``, ``ScaledStdConv2d``, smp's static-SAME
   convs...); outputs must have the original's shapes and be finite. The ``all_3x3`` rewrite at
   m = 1 gives ``m1_error``, the proof that the replaced convs reach the outputs;
4. calls ``dsrewrite.rewrite(model, "all_3x3", example_inputs=x, depth_multiplier=9)`` (a 3×3
   kernel is represented exactly at m = kh·kw = 9) and measures ``m9_error``, the relative L2
   error ``‖y_rewritten − y‖ / ‖y‖`` (worst output tensor); it must stay below ``--tol``
   (1e-4, fp32). Above it, the model still passes (with a warning) only if the network itself
   amplifies rounding (see :func:`_diagnose_amplification`) and every swapped block is exact
   on its own (:func:`layerwise_error`).

A model that cannot be built or run on any candidate input is *excluded*, not failed.
Skip reasons are tallied by their leading phrase (:func:`reason_group`).

Reproduce (docs/zoo.md)::

    .venv/bin/python bench/zoo.py --out docs/zoo.md --json /tmp/zoo.json
    .venv/bin/python bench/zoo.py --quick                 # the 8 models of the default test run
    .venv/bin/python bench/zoo.py --only 'timm/tf_*'      # glob over model names
    .venv/bin/python bench/zoo.py --list                  # the models and their candidate inputs

Not a test: ``tests/test_zoo.py`` runs the representative subset (and every model with ``-m slow``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import json
import math
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

import dsrewrite
from dsrewrite.apply import apply_plan
from dsrewrite.capture import capture  # the function (the package re-exports it too)
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.planner import NothingSelectedWarning, plan_from_capture
from dsrewrite.recipe import load_recipe

__all__ = [
    "ZooModel",
    "RecipeOutcome",
    "ZooResult",
    "RECIPES",
    "QUICK",
    "zoo",
    "reason_group",
    "model_family",
    "own_forward",
    "pick_input",
    "layerwise_error",
    "sweep_model",
    "sweep",
    "render_markdown",
    "load_results",
    "main",
]

RECIPES: tuple[str, ...] = ("all_3x3", "decoder_only")
TOL = 1e-4
SIZES = (64, 128, 224)


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: ``name`` like ``"timm/resnet18"``; ``build`` makes it with random weights.

    ``sizes`` are the square input sides tried in order (the first on which the
    original model runs is used); ``note`` says why a model needs a particular size.
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    sizes: tuple[int, ...] = SIZES
    note: str = ""


@dataclass
class RecipeOutcome:
    """What one recipe did to one model: counts, skip reasons by leading phrase, selection reasons as given."""

    replaced: int = 0
    skipped: int = 0
    nothing_selected: bool = False
    reasons: dict[str, int] = field(default_factory=dict)
    selected_because: dict[str, int] = field(default_factory=dict)


@dataclass
class ZooResult:
    """The sweep's record for one model; ``status`` is ``ok``, ``FAIL`` or ``excluded``."""

    name: str
    family: str
    input_shape: Optional[tuple[int, ...]] = None
    capture: str = ""
    convs: int = 0
    own_forward: list[str] = field(default_factory=list)
    functional: list[str] = field(default_factory=list)
    capture_notes: list[str] = field(default_factory=list)
    recipes: dict[str, RecipeOutcome] = field(default_factory=dict)
    m1_error: Optional[float] = None
    m9_error: Optional[float] = None
    layer_error: Optional[float] = None
    fp32_noise: Optional[float] = None
    m9_replaced: Optional[int] = None
    status: str = "ok"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    woken: int = 0
    recalibrated: int = 0
    seconds: float = 0.0
    note: str = ""
    load_seconds: Optional[float] = None

    def fail(self, what: str) -> None:
        self.status = "FAIL"
        self.problems.append(what)


# --------------------------------------------------------------------------- the zoo


def _tv_classification() -> list[ZooModel]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        def build(name: str = name) -> nn.Module:
            return torchvision.models.get_model(name, weights=None)

        sizes = SIZES
        note = ""
        if name.startswith("vit_"):
            sizes, note = (224,), "torchvision ViT: fixed image_size 224"
        elif name == "inception_v3":
            sizes, note = (128, 299), "inception_v3 needs ≥ 75 px"
        out.append(ZooModel(f"tv/{name}", "torchvision cls", build, sizes, note))
    return out


def _tv_segmentation() -> list[ZooModel]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        def build(name: str = name) -> nn.Module:
            return torchvision.models.get_model(name, weights=None, weights_backbone=None)

        out.append(ZooModel(f"tv/{name}", "torchvision seg", build))
    return out


#: timm models: (name, note). Chosen across families; the notes say why each is interesting.
TIMM_MODELS: tuple[tuple[str, str], ...] = (
    ("resnet18", ""),
    ("resnet26d", "deep stem"),
    ("resnet10t", ""),
    ("seresnext26d_32x4d", "grouped 3×3"),
    ("resnest14d", "split attention (grouped)"),
    ("res2net50_14w_8s", ""),
    ("skresnet18", "selective kernel"),
    ("ecaresnet26t", ""),
    ("resnetrs50", ""),
    ("resnetblur18", "blur pool (functional conv)"),
    ("resnetv2_50x1_bit", "StdConv2d (own forward)"),
    ("resnetv2_50", ""),
    ("efficientnet_b0", ""),
    ("tf_efficientnet_b0", "Conv2dSame (TF SAME padding)"),
    ("tf_efficientnetv2_b0", "Conv2dSame"),
    ("efficientnetv2_rw_t", ""),
    ("tf_efficientnet_cc_b0_4e", "CondConv2d: functional F.conv2d"),
    ("mixnet_s", "MixedConv2d"),
    ("tf_mixnet_s", "MixedConv2d + SAME"),
    ("efficientnet_lite0", ""),
    ("tf_efficientnet_lite0", "SAME padding"),
    ("mnasnet_100", ""),
    ("spnasnet_100", ""),
    ("fbnetc_100", ""),
    ("lcnet_050", ""),
    ("tinynet_e", ""),
    ("mobilenetv2_050", ""),
    ("mobilenetv3_small_100", ""),
    ("tf_mobilenetv3_small_100", "SAME padding"),
    ("mobilenetv4_conv_small", ""),
    ("mobilenetv4_hybrid_medium", "attention blocks"),
    ("ghostnet_100", ""),
    ("ghostnetv2_100", ""),
    ("regnetx_002", "grouped"),
    ("regnety_002", ""),
    ("regnetz_b16", ""),
    ("densenet121", ""),
    ("dla34", ""),
    ("dpn68", ""),
    ("hrnet_w18_small", "multi-resolution, upsampling"),
    ("cspresnet50", ""),
    ("cspdarknet53", ""),
    ("darknet53", ""),
    ("cs3darknet_s", ""),
    ("ese_vovnet19b_dw", ""),
    ("vovnet39a", ""),
    ("rexnet_100", ""),
    ("hardcorenas_a", ""),
    ("repvgg_a0", "RepVGG blocks"),
    ("mobileone_s0", "MobileOne blocks"),
    ("fastvit_t8", "reparam blocks"),
    ("convnext_atto", "7×7 depthwise"),
    ("convnextv2_atto", ""),
    ("inception_v3", ""),
    ("inception_v4", ""),
    ("legacy_xception", ""),
    ("xception41", ""),
    ("selecsls42b", ""),
    ("tresnet_m", "space-to-depth stem"),
    ("nf_resnet26", "ScaledStdConv2d (own forward)"),
    ("nfnet_l0", "ScaledStdConv2d"),
    ("dm_nfnet_f0", "ScaledStdConv2dSame"),
    ("eca_nfnet_l0", "ScaledStdConv2d"),
    ("vgg16", "ConvMlp pre-logits"),
    ("vgg11_bn", ""),
    ("mobilevit_xxs", "unfold/fold transformer blocks"),
    ("mobilevitv2_050", ""),
    ("efficientvit_b0", "MIT EfficientViT"),
    ("efficientvit_m0", "MSRA EfficientViT"),
    ("levit_128s", "conv stem + attention"),
    ("vit_tiny_patch16_224", "patch-embed conv only"),
    ("deit_tiny_patch16_224", ""),
    ("swin_tiny_patch4_window7_224", ""),
    ("pit_ti_224", "conv pooling"),
    ("maxvit_tiny_rw_224", ""),
    ("coatnet_0_rw_224", ""),
    ("edgenext_xx_small", ""),
    ("poolformer_s12", ""),
    ("gernet_s", ""),
    ("twins_svt_small", "PosConv"),
    ("pvt_v2_b0", ""),
    ("efficientformer_l1", ""),
    ("efficientformerv2_s0", ""),
    ("tiny_vit_5m_224", ""),
    ("repvit_m1", ""),
    ("botnet26t_256", "bottleneck attention"),
    ("halonet26t", ""),
    ("xcit_nano_12_p16_224", ""),
    ("hgnet_tiny", ""),
    ("hgnetv2_b0", ""),
    ("fasternet_t0", "partial conv"),
    ("starnet_s1", ""),
    ("inception_next_tiny", ""),
    ("davit_tiny", ""),
    ("focalnet_tiny_srf", ""),
    ("gcvit_xxtiny", ""),
    ("mambaout_femto", ""),
)


def _timm() -> list[ZooModel]:
    import timm

    out = []
    for name, note in TIMM_MODELS:
        def build(name: str = name) -> nn.Module:
            return timm.create_model(name, pretrained=False)

        cfg = timm.get_pretrained_cfg(name)
        side = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
        sizes = tuple(sorted({64, 128, side}))
        out.append(ZooModel(f"timm/{name}", "timm", build, sizes, note))
    return out


SMP_ARCHS: tuple[str, ...] = ("Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "Linknet", "PAN", "MAnet")
SMP_ENCODERS: tuple[str, ...] = ("resnet18", "efficientnet-b0", "mobilenet_v2", "tu-resnet18")


def _smp() -> list[ZooModel]:
    import segmentation_models_pytorch as smp

    out = []
    for arch in SMP_ARCHS:
        for enc in SMP_ENCODERS:
            def build(arch: str = arch, enc: str = enc) -> nn.Module:
                return getattr(smp, arch)(enc, encoder_weights=None, classes=2)

            sizes = (64, 128, 256) if arch != "PAN" else (128, 256)
            out.append(ZooModel(f"smp/{arch}-{enc}", "smp", build, sizes))
    return out


#: The representative subset: ``--quick`` and the default run of tests/test_zoo.py.
QUICK: tuple[str, ...] = (
    "tv/resnet18",  # fx; encoder convs replaced, no decoder (NothingSelectedWarning for decoder_only)
    "tv/lraspp_mobilenet_v3_large",  # dict outputs; every 3×3 is depthwise: nothing selected
    "timm/tf_mobilenetv3_small_100",  # Conv2dSame: own forward, never replaced
    "timm/tf_efficientnet_cc_b0_4e",  # CondConv2d: functional F.conv2d, not replaceable
    "timm/nf_resnet26",  # ScaledStdConv2d; fx fails, torch.export fallback
    "timm/mobilevit_xxs",  # fx fails, torch.export fallback, some convs replaced
    "smp/Unet-mobilenet_v2",  # smp decoder replaced (convs after concat and upsample)
    "smp/Linknet-tu-resnet18",  # timm encoder (zero-initialised last BN), transposed convs
)


def zoo(quick: bool = False, only: Sequence[str] = ()) -> list[ZooModel]:
    """The models of the sweep, in order; ``quick`` keeps :data:`QUICK`; ``only`` filters by glob.

    Example:
        >>> [m.name for m in zoo(quick=True)][:2]
        ['tv/resnet18', 'tv/lraspp_mobilenet_v3_large']
    """
    models = _tv_classification() + _tv_segmentation() + _timm() + _smp()
    if quick:
        order = {n: i for i, n in enumerate(QUICK)}
        models = sorted((m for m in models if m.name in order), key=lambda m: order[m.name])
    if only:
        models = [m for m in models if any(fnmatch.fnmatchcase(m.name, p) for p in only)]
    return models


# --------------------------------------------------------------------------- helpers


_QUOTED = re.compile(r"'[^']*'")
_NUMBER = re.compile(r"(?<![\w×.])\d+(?:\.\d+)?(?![\w×])")


def reason_group(reason: str) -> str:
    """The leading phrase of a skip reason (up to `` (``, ``; `` or `` [``), numbers and quoted names masked.

    Kernel sizes (``7×7``) and class names (``Conv2dSame``) are kept.

    Example:
        >>> reason_group("in_channels 3 < 16 (select.in_channels.min)")
        'in_channels N < N'
        >>> reason_group("region 'encoder' not in select.regions [decoder, decoders, … 10 in all]")
        "region '…' not in select.regions"
        >>> reason_group("7×7 not in select.kernel_size [3×3]")
        '7×7 not in select.kernel_size'
    """
    text = reason
    for sep in (" (", "; ", " ["):
        cut = text.find(sep)
        if cut > 0:
            text = text[:cut]
    text = _QUOTED.sub("'…'", text)
    return _NUMBER.sub("N", text).strip()


def model_family(model: nn.Module) -> str:
    """The family a model's class comes from: its defining module's last part, else the class name.

    Example:
        >>> import torchvision
        >>> model_family(torchvision.models.resnet18()), model_family(nn.Sequential())
        ('resnet', 'container')
    """
    tail = type(model).__module__.rsplit(".", 1)[-1]
    return type(model).__name__ if tail in ("model", "models", "__main__") else tail


def own_forward(module: nn.Module) -> bool:
    """True for a 2-D conv whose computation differs from ``nn.Conv2d``'s (checked here, independently).

    Example:
        >>> class Same(nn.Conv2d):
        ...     def forward(self, x):
        ...         return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))
        >>> own_forward(nn.Conv2d(3, 3, 3)), own_forward(Same(3, 3, 3))
        (False, True)
    """
    if not isinstance(module, nn.Conv2d):
        return False
    cls = type(module)
    return (cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
            or "forward" in vars(module))


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _forward(model: nn.Module, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return _tensors(model(x))


def _x(side: int, seed: int) -> Tensor:
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


def rel_error(out: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """Max over output tensors of ``‖a − b‖ / ‖b‖`` (float64 norms; absolute when ``‖b‖ = 0``).

    Example:
        >>> round(rel_error([torch.full((4,), 1.5)], [torch.ones(4)]), 6)
        0.5
    """
    worst = 0.0
    for a, b in zip(out, ref):
        num = (a.double() - b.double()).norm().item()
        den = b.double().norm().item()
        worst = max(worst, num / den if den > 0 else num)
    return worst


def pick_input(model: nn.Module, sizes: Sequence[int], *, recalibrate: bool = False) -> tuple[Tensor, int]:
    """The first seeded ``1×3×s×s`` input (seed 0) the model runs on; raises RuntimeError if none.

    With ``recalibrate`` the probe at each size is :func:`recalibrate_bn` on a seeded
    ``2×3×s×s`` batch (seed 2), so the BatchNorm statistics come from the size used.
    Returns the input and the number of BatchNorm modules recalibrated.

    Example:
        >>> x, n = pick_input(nn.Sequential(nn.Conv2d(3, 4, 5), nn.BatchNorm2d(4)), (2, 8), recalibrate=True)
        >>> tuple(x.shape), n
        ((1, 3, 8, 8), 1)
    """
    errors = []
    recalibrate = recalibrate and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for side in sizes:
        x = _x(side, 0)
        try:
            if recalibrate:
                batch = torch.randn((2, *x.shape[1:]), generator=torch.Generator().manual_seed(2))
                return x, recalibrate_bn(model, batch)
            _forward(model, x)
            return x, 0
        except Exception as e:  # any failure means "not this size"
            errors.append(f"{side}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    raise RuntimeError("runs on none of the input sizes " + "; ".join(errors))


def wake_up(model: nn.Module) -> int:
    """Set every zero-initialised gain of ``model`` to 1 (in place); returns how many parameters changed.

    Random-weight models are not trained models: timm zero-initialises the last norm
    weight of each residual branch (``zero_init_last``), NFNets start their skip gains at
    0 and layer-scale gains start at 1e-5 or 1e-6, so a conv inside such a branch does not
    reach the outputs and an output comparison would say nothing about it. A gain here is
    a floating parameter of at most one dimension that is not a bias, with every value
    below 1e-3 in magnitude. Nothing else changes (re-randomising every norm layer makes
    deep random nets chaotic: rounding noise then grows to O(1) differences).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> _ = nn.init.zeros_(net[1].weight)
        >>> wake_up(net), net[1].weight.tolist(), net[1].bias.tolist()
        (1, [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    """
    changed = 0
    for name, p in model.named_parameters():
        if p.dim() > 1 or not p.is_floating_point() or not p.numel() or name.rsplit(".", 1)[-1] == "bias":
            continue
        if p.detach().abs().max() < 1e-3:
            with torch.no_grad():
                p.fill_(1.0)
            changed += 1
    return changed


def recalibrate_bn(model: nn.Module, batch: Tensor) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batch`` (in place); returns how many.

    With random weights and the default running statistics (mean 0, variance 1) the
    activations of some deep nets vanish (torchvision's MobileNetV3 backbone ends near
    1e-8, so its segmentation heads see no input at all). Statistics estimated on a
    random batch keep every layer's output normalised, as in a trained model. Only the
    BatchNorm modules run in training mode (dropout stays off); each one's momentum and
    every module's training flag are restored.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> recalibrate_bn(net, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 5)
        1
        >>> bool(net[1].running_var.min() > 1), net[1].training
        (True, False)
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [(m, m.momentum) for m in bns]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
            m.train()
        with torch.no_grad():
            model(batch)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, flag in flags:
            m.training = flag
    return len(bns)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(_sig: int, _frame: Any) -> None:
        raise _Timeout(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


# --------------------------------------------------------------------------- one model


def _check_rewritten(res: ZooResult, tag: str, model: nn.Module, new: nn.Module, replaced: set[str],
                     x: Tensor, ref: list[Tensor]) -> Optional[list[Tensor]]:
    """Class, replace count, own-forward convs untouched; shapes and finiteness of the outputs on ``x``.

    Returns the outputs when they have the original's shapes (``None`` otherwise, or when
    nothing was replaced: the model then computes exactly what the original does and is
    not run again).
    """
    swapped = {n for n, m in new.named_modules() if isinstance(m, DepthwiseSeparableConv2d)}
    if swapped != replaced:
        res.fail(f"{tag}: {len(swapped)} DepthwiseSeparableConv2d modules but the plan replaces {len(replaced)}")
    hit = sorted(set(res.own_forward) & swapped)
    if hit:
        res.fail(f"{tag}: replaced conv(s) with their own forward: {', '.join(hit[:3])}")
    if type(new) is not type(model):
        res.fail(f"{tag}: returned {type(new).__name__}, not {type(model).__name__}")
    if not swapped:
        return None
    out = _forward(new.eval(), x)
    shapes, ref_shapes = [tuple(t.shape) for t in out], [tuple(t.shape) for t in ref]
    if shapes != ref_shapes:
        res.fail(f"{tag}: output shapes {shapes} != original {ref_shapes}")
        return None
    if not all(torch.isfinite(t).all() for t in out if t.is_floating_point()):
        res.fail(f"{tag}: non-finite outputs")
    return out


def sweep_model(spec: ZooModel, *, tol: float = TOL, timeout: int = 0, wake: bool = True) -> ZooResult:
    """Run the sweep's checks on one model (see the module docstring); never raises.

    Example:
        >>> spec = ZooModel("toy", "toy", lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)), (16,))
        >>> r = sweep_model(spec)
        >>> r.status, r.recipes["all_3x3"].replaced, r.m9_error < 1e-5
        ('ok', 1, True)
    """
    res = ZooResult(spec.name, spec.family, note=spec.note)
    t0 = time.perf_counter()
    try:
        with _time_limit(timeout):
            _sweep_into(res, spec, tol, wake)
    except _Timeout as e:
        res.fail(f"timeout: {e}")
    except Exception as e:  # recorded, the sweep goes on
        res.fail(f"{_first_line(e)} @ {traceback.extract_tb(e.__traceback__)[-1].name}")
    res.seconds = time.perf_counter() - t0
    return res


def _sweep_into(res: ZooResult, spec: ZooModel, tol: float, wake: bool) -> None:
    torch.manual_seed(0)
    try:
        model = spec.build().eval()
    except Exception as e:
        res.status, res.problems = "excluded", [f"cannot be built: {_first_line(e)}"]
        return
    res.family = f"{spec.family}: {model_family(model)}"
    if wake:
        res.woken = wake_up(model)
    try:
        x, res.recalibrated = pick_input(model, spec.sizes, recalibrate=wake)
    except RuntimeError as e:
        res.status, res.problems = "excluded", [str(e)[:300]]
        return
    ref = _forward(model, x)
    res.input_shape = tuple(x.shape)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, _ConvNd)}
    res.convs = len(convs)
    res.own_forward = sorted(n for n, m in convs.items() if own_forward(m))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = capture(model, x)
    res.capture = cap.method
    res.functional = list(cap.functional_convs)
    res.capture_notes = list(cap.notes)
    if [f.name for f in cap.facts] != list(convs):
        res.fail("capture: facts do not list every conv module in named_modules order")
    selected_all: set[str] = set()
    for recipe in RECIPES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = plan_from_capture(model, load_recipe(recipe), cap)
        outcome = RecipeOutcome(
            replaced=len(p.replaced),
            skipped=len(p.skipped),
            nothing_selected=any(issubclass(w.category, NothingSelectedWarning) for w in caught),
            reasons=dict(Counter(reason_group(e.reason) for e in p.skipped)),
            selected_because=dict(Counter(e.reason for e in p.replaced)),
        )
        res.recipes[recipe] = outcome
        told = sum("not replaceable" in n for n in p.notes)
        if told < len(cap.functional_convs):
            res.fail(f"{recipe}: {len(cap.functional_convs)} functional convolution(s) but {told} plan note(s) "
                     "saying they are not replaceable")
        if any(not e.reason.strip() for e in p.entries):
            res.fail(f"{recipe}: an entry has no reason")
        wrong = [e.name for e in p.entries if e.name in res.own_forward and "own forward" not in e.reason]
        if wrong:
            res.fail(f"{recipe}: own-forward conv(s) skipped without saying so: {', '.join(wrong[:3])}")
        wrong = [e.name for e in p.entries if e.name not in res.own_forward and "own forward" in e.reason]
        if wrong:
            res.fail(f"{recipe}: plain nn.Conv2d forward but skipped for an own forward: {', '.join(wrong[:3])}")
        names = {e.name for e in p.replaced}
        if recipe == "all_3x3":
            selected_all = names
        new = apply_plan(model, p)
        out = _check_rewritten(res, recipe, model, new, names, x, ref)
        if recipe == "all_3x3" and out is not None:
            res.m1_error = rel_error(out, ref)
        del new
    res.m9_replaced = 0
    if not selected_all:  # nothing to reproduce
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = dsrewrite.rewrite(model, "all_3x3", example_inputs=x, depth_multiplier=9)
    res.m9_replaced = sum(isinstance(m, DepthwiseSeparableConv2d) for m in exact.modules())
    out = _check_rewritten(res, "all_3x3 m=9", model, exact, selected_all, x, ref)
    if out is not None:
        res.m9_error = rel_error(out, ref)
        if not math.isfinite(res.m9_error) or res.m9_error > tol:
            _diagnose_amplification(res, model, exact, selected_all, x, ref, tol)
        _save_and_reload(res, exact, x, out)
    if selected_all and res.m1_error == 0.0:
        res.warnings.append("the m=1 rewrite leaves the outputs bit-identical: the replaced convs do not "
                            "reach the outputs, so the m=9 check says nothing")


def layerwise_error(model: nn.Module, rewritten: nn.Module, names: Sequence[str], x: Tensor
                    ) -> tuple[float, list[str]]:
    """Each swapped block against its dense conv, on the original model's own activations.

    Runs ``model`` on ``x`` recording the first input of every conv in ``names``, then
    feeds that input to the dense conv and to the block at the same name in
    ``rewritten``. Returns the worst relative L2 error over the blocks, and the names
    whose block is called a different number of times in ``rewritten`` than the conv
    in ``model`` (a swap the forward does not reach, or reaches twice).

    Example:
        >>> import dsrewrite
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
        >>> new = dsrewrite.rewrite(net, "all_3x3", example_inputs=x, depth_multiplier=9)
        >>> err, miscalled = layerwise_error(net, new, ["1"], x)
        >>> err < 1e-5, miscalled
        (True, [])
    """
    inputs: dict[str, Tensor] = {}
    calls: dict[str, Counter] = {"model": Counter(), "rewritten": Counter()}
    handles = []

    def hook(tag: str, name: str) -> Callable[..., None]:
        def pre(_mod: nn.Module, args: tuple) -> None:
            calls[tag][name] += 1
            if tag == "model" and name not in inputs and args and isinstance(args[0], Tensor):
                inputs[name] = args[0].detach().clone()
        return pre

    try:
        for tag, net in (("model", model), ("rewritten", rewritten)):
            for name in names:
                handles.append(net.get_submodule(name).register_forward_pre_hook(hook(tag, name)))
            _forward(net, x)
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    with torch.no_grad():
        for name in names:
            if name in inputs:
                dense = model.get_submodule(name)(inputs[name])
                block = rewritten.get_submodule(name)(inputs[name])
                worst = max(worst, rel_error([block], [dense]))
    miscalled = [n for n in names if calls["model"][n] != calls["rewritten"][n]]
    return worst, miscalled


def _save_and_reload(res: ZooResult, rewritten: nn.Module, x: Tensor, out: Sequence[Tensor]) -> None:
    """``torch.save`` the rewritten model and read it back with ``dsrewrite.io.load_model`` (the safe loader,
    no --trust-pickle): it must load and give bit-identical outputs. Records the load time in seconds."""
    import tempfile

    from dsrewrite.io import load_model

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/rewritten.pt"
        torch.save(rewritten, path)
        t0 = time.perf_counter()
        try:
            back = load_model(path).model
        except Exception as e:  # a refusal of a real model is a failure of the loader
            res.fail(f"reload through the safe loader: {_first_line(e)}")
            return
        res.load_seconds = time.perf_counter() - t0
    again = _forward(back.eval(), x)
    if len(again) != len(out) or any(not torch.equal(a, b) for a, b in zip(again, out)):
        res.fail("the reloaded rewrite gives different outputs")


def _diagnose_amplification(res: ZooResult, model: nn.Module, exact: nn.Module, names: set[str], x: Tensor,
                            ref: list[Tensor], tol: float) -> None:
    """The fp32 m=9 output error is above ``tol``: is the rewrite inexact, or does the network amplify rounding?

    Passes (with a warning) only when all three hold: every swapped block reproduces its
    dense conv on the original's activations to ``tol`` (:func:`layerwise_error`), every
    block is called as often as its conv, and the original model is itself that sensitive:
    its own fp32 outputs differ from its float64 outputs (``fp32_noise``) by at least
    1/100 of the rewrite's error. Random-weight networks with normalised activations can
    be chaotic (EfficientNetV2 at depth): any rounding difference, even a float64 one,
    grows to an O(1) output difference, so an end-to-end comparison cannot tell.
    """
    with torch.no_grad():
        res.fp32_noise = rel_error(ref, _forward(copy.deepcopy(model).double(), x.double()))
    res.layer_error, miscalled = layerwise_error(model, exact, sorted(names), x)
    assert res.m9_error is not None
    if res.layer_error <= tol and not miscalled and res.m9_error <= 100 * res.fp32_noise:
        res.warnings.append(
            f"m=9 output error {res.m9_error:.1e} > {tol:g} is rounding noise this random-weight network "
            f"amplifies: the original's own fp32 outputs differ from its float64 ones by {res.fp32_noise:.1e}, "
            f"and each swapped block reproduces its dense conv to {res.layer_error:.1e} on the original's "
            "activations")
    else:
        res.fail(f"all_3x3 m=9: relative error {res.m9_error:.2e} > {tol:g} (per swapped block: "
                 f"{res.layer_error:.1e}; called a different number of times: {miscalled[:3] or 'none'}; "
                 f"the original's own fp32-vs-float64 difference: {res.fp32_noise:.1e})")


def sweep(models: Sequence[ZooModel], *, tol: float = TOL, timeout: int = 0, wake: bool = True,
          log: Optional[Callable[[ZooResult], None]] = None) -> list[ZooResult]:
    """:func:`sweep_model` over ``models``, freeing memory between models; ``log`` sees each result."""
    results = []
    for spec in models:
        r = sweep_model(spec, tol=tol, timeout=timeout, wake=wake)
        results.append(r)
        if log is not None:
            log(r)
        gc.collect()
    return results


# --------------------------------------------------------------------------- rendering


def _cell(o: Optional[RecipeOutcome]) -> str:
    if o is None:
        return "–"
    return f"{o.replaced}/{o.skipped}" + (" ∅" if o.nothing_selected else "")


def _err(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1e}"


def _functional_calls(r: ZooResult) -> int:
    return sum(int(f.rsplit(" x", 1)[1]) if re.search(r" x\d+$", f) else 1 for f in r.functional)


def _grouped_notes(results: Sequence[ZooResult]) -> list[str]:
    """Capture notes, models with the same note (conv names masked) listed together."""
    by_note: dict[str, list[str]] = {}
    for r in results:
        if r.capture and r.capture != "fx":
            text = " ".join(r.capture_notes)
            text = re.sub(r"\(e\.g\. [^)]*\)", "(…)", text)
            text = re.sub(r"hiding \d+ conv", "hiding N conv", text)
            by_note.setdefault(text, []).append(r.name)
    return [f"- {', '.join(names)}: {note}" for note, names in sorted(by_note.items(), key=lambda kv: -len(kv[1]))]


def render_markdown(results: Sequence[ZooResult], *, command: str, tol: float = TOL,
                    meta: Optional[dict[str, str]] = None) -> str:
    """docs/zoo.md: summary, failures and exclusions, the results table, skip-reason tallies, notes.

    Example:
        >>> r = ZooResult("toy/a", "toy", input_shape=(1, 3, 8, 8), capture="fx")
        >>> "| toy/a | toy | 1×3×8×8 | fx |" in render_markdown([r], command="python bench/zoo.py")
        True
    """
    ok = [r for r in results if r.status == "ok"]
    failed = [r for r in results if r.status == "FAIL"]
    excluded = [r for r in results if r.status == "excluded"]
    ran = [r for r in results if r.status != "excluded"]
    lines = [
        "# The zoo sweep",
        "",
        "Every model is built with random weights (nothing downloaded), captured once, planned and",
        "rewritten with the built-in recipes `all_3x3` and `decoder_only`, and rewritten again with",
        "`dsrewrite.rewrite(model, \"all_3x3\", example_inputs=x, depth_multiplier=9)`, where a 3×3 conv",
        "is represented exactly (m = kh·kw): its outputs must match the original's to a relative L2",
        f"error below {tol:g} (fp32, worst output tensor). Each rewritten model must give outputs of the",
        "original's shapes, all finite; no conv whose forward differs from `nn.Conv2d` may be replaced;",
        "functional convolutions must be named in the plan notes. Before the checks the sweep sets",
        "zero-initialised gains to 1 and re-estimates BatchNorm statistics on a random batch",
        "(`wake_up`, `recalibrate_bn` in `bench/zoo.py`), so that every replaced conv reaches the",
        "outputs; the *m=1 err* column (the `all_3x3` rewrite at m = 1) shows it does.",
        "",
        "Generated by (the full sweep; `--quick` runs the 8 models of the default test run):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if meta:
        lines += [", ".join(f"{k} {v}" for k, v in meta.items()) + ".", ""]
    caps = Counter(r.capture for r in ran if r.capture)
    none = {rec: sum(1 for r in ran if rec in r.recipes and r.recipes[rec].nothing_selected) for rec in RECIPES}
    lines += [
        f"**{len(results)} models: {len(ok)} ok, {len(failed)} failed, {len(excluded)} excluded.** "
        f"Captures: {', '.join(f'{k} {v}' for k, v in caps.most_common())}. "
        f"Nothing selected (a `NothingSelectedWarning`): all_3x3 {none['all_3x3']}, "
        f"decoder_only {none['decoder_only']} models. "
        f"Convs replaced in all: all_3x3 {sum(r.recipes['all_3x3'].replaced for r in ran if 'all_3x3' in r.recipes)}, "
        f"decoder_only {sum(r.recipes['decoder_only'].replaced for r in ran if 'decoder_only' in r.recipes)}.",
        "",
        "## Failed",
        "",
    ]
    lines += [f"- {r.name}: {'; '.join(r.problems)}" for r in failed] or ["None."]
    lines += ["", "## Excluded", ""]
    lines += [f"- {r.name}: {'; '.join(r.problems)}" for r in excluded] or ["None."]
    warned = [r for r in results if r.warnings]
    lines += ["", "## Passed with a warning", ""]
    lines += [f"- {r.name}: {'; '.join(r.warnings)}" for r in warned] or ["None."]
    lines += [
        "",
        "## Results",
        "",
        "*input* the smallest working square input tried (ViTs and other fixed-size models: their",
        "`img_size`); *capture* `fx`, `export` (torch.export fallback) or `names`; *all_3x3*,",
        "*decoder_only* `replaced/skipped` conv modules (∅: nothing selected); *own fwd* conv modules whose",
        "forward differs from `nn.Conv2d` (never replaced); *func* functional convolution calls (not",
        "replaceable); *m=1 err* / *m=9 err* relative L2 output error of `all_3x3` at m = 1 / m = 9; *load s*",
        "seconds to read the saved m = 9 rewrite back through the safe loader (`dsrewrite.io.load_model`, no",
        "--trust-pickle; its outputs must be bit-identical); *s* seconds for all checks of the model.",
        "",
        "| model | family | input | capture | all_3x3 | decoder_only | own fwd | func | m=1 err | m=9 err | load s "
        "| status | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = "×".join(str(v) for v in r.input_shape) if r.input_shape else "–"
        status = {"FAIL": "**FAIL**", "ok": "ok" + (" ⚠" if r.warnings else "")}.get(r.status, r.status)
        lines.append(
            f"| {r.name} | {r.family} | {shape} | {r.capture or '–'} | {_cell(r.recipes.get('all_3x3'))} | "
            f"{_cell(r.recipes.get('decoder_only'))} | {len(r.own_forward)} | {_functional_calls(r)} | "
            f"{_err(r.m1_error)} | {_err(r.m9_error)} | "
            f"{'–' if r.load_seconds is None else f'{r.load_seconds:.2f}'} | {status} | {r.seconds:.0f} |"
        )
    lines += ["", "## Skip reasons", "",
              "Skipped conv modules over all models, by the leading phrase of the reason (numbers and",
              "quoted names masked).", ""]
    for recipe in RECIPES:
        tally: Counter = Counter()
        for r in results:
            if recipe in r.recipes:
                tally.update(r.recipes[recipe].reasons)
        lines += [f"### {recipe}", "", "| reason | convs | models |", "|---|---|---|"]
        for k, v in tally.most_common():
            n = sum(1 for r in results if recipe in r.recipes and k in r.recipes[recipe].reasons)
            lines.append(f"| {k} | {v} | {n} |")
        lines.append("")
    dec = [r for r in ran if "decoder_only" in r.recipes and r.recipes["decoder_only"].replaced
           and not r.family.startswith(("smp", "torchvision seg"))]
    if dec:
        lines += ["## decoder_only on classification models", "",
                  "`decoder_only` selects by region name (`head`, `neck`, `classifier`, …) and, where no conv",
                  "of the model sits in one, by the graph (after the encoder's deepest point). On these classification",
                  "models that finds convs; the selection reasons:", ""]
        for r in dec:
            why = "; ".join(f"{k} ×{v}" for k, v in r.recipes["decoder_only"].selected_because.items())
            lines.append(f"- {r.name} ({r.recipes['decoder_only'].replaced}): {why[:300]}")
        lines.append("")
    notes = _grouped_notes(results)
    if notes:
        lines += ["## Why fx was not enough", ""] + notes + [""]
    funcs = [r for r in results if r.functional]
    if funcs:
        lines += ["## Functional convolutions (not replaceable)", ""]
        lines += [f"- {r.name} ({_functional_calls(r)} calls): {'; '.join(r.functional[:3])}"
                  + (f"; … {len(r.functional)} call sites" if len(r.functional) > 3 else "") for r in funcs]
        lines.append("")
    own = [r for r in results if r.own_forward]
    if own:
        lines += ["## Convs with their own forward (skipped, never replaced)", ""]
        for r in own:
            kinds = Counter(k for k in r.recipes.get("all_3x3", RecipeOutcome()).reasons if "own forward" in k)
            lines.append(f"- {r.name}: {len(r.own_forward)} ({', '.join(k.split(' has ')[0] for k in kinds)})")
        lines.append("")
    return "\n".join(lines) + "\n"


def _log(r: ZooResult) -> None:
    a, d = r.recipes.get("all_3x3"), r.recipes.get("decoder_only")
    print(f"{r.status:8s} {r.name:45s} {r.capture or '-':6s} all_3x3 {_cell(a):9s} decoder_only {_cell(d):9s} "
          f"m1 {_err(r.m1_error):8s} m9 {_err(r.m9_error):8s} {r.seconds:6.1f}s "
          f"{'; '.join(r.problems + r.warnings)[:300]}", flush=True)


def load_results(path: str) -> tuple[list[ZooResult], str, dict[str, str]]:
    """Results written by ``--json``, with the command and the metadata of that run (to re-render)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows = data["results"] if isinstance(data, dict) else data
    command = data.get("command", "python bench/zoo.py") if isinstance(data, dict) else "python bench/zoo.py"
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    out = []
    for row in rows:
        recipes = {k: RecipeOutcome(**v) for k, v in row.pop("recipes").items()}
        shape = row.pop("input_shape")
        out.append(ZooResult(**row, recipes=recipes, input_shape=tuple(shape) if shape else None))
    return out, command, meta


def _meta(threads: int, seconds: float) -> dict[str, str]:
    import platform

    import timm
    import torchvision

    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
    try:
        import segmentation_models_pytorch as smp

        meta["smp"] = smp.__version__
    except ImportError:
        pass
    meta.update({"CPU": platform.machine(), "torch threads": str(threads),
                 "wall time": f"{seconds / 60:.0f} min (on a shared machine)"})
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: run the sweep, print one line per model, write Markdown / JSON; exit 1 on any failure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the representative subset (QUICK)")
    ap.add_argument("--only", action="append", default=[], help="glob over model names (repeatable)")
    ap.add_argument("--out", help="write the Markdown page here (e.g. docs/zoo.md)")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--render", metavar="JSON", help="no sweep: render --out from results saved with --json")
    ap.add_argument("--tol", type=float, default=TOL, help="m=9 relative error bound (default 1e-4)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-wake", action="store_true", help="keep the models' own init (see wake_up)")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    args = ap.parse_args(argv)
    shown = ["python bench/zoo.py"] + (["--quick"] if args.quick else []) + \
        [f"--only '{o}'" for o in args.only] + ([f"--tol {args.tol:g}"] if args.tol != TOL else []) + \
        (["--no-wake"] if args.no_wake else []) + ([f"--out {args.out}"] if args.out else [])
    if args.render:
        results, command, meta = load_results(args.render)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(render_markdown(results, command=command, tol=args.tol, meta=meta))
        return 1 if any(r.status == "FAIL" for r in results) else 0
    models = zoo(quick=args.quick, only=args.only)
    if args.list:
        print("\n".join(f"{m.name}  ({m.family}) sizes {m.sizes} {m.note}" for m in models))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = sweep(models, tol=args.tol, timeout=args.timeout, wake=not args.no_wake, log=_log)
    total = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"command": " ".join(shown), "meta": _meta(args.threads, total),
                       "results": [asdict(r) for r in results]}, fh, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(render_markdown(results, command=" ".join(shown), tol=args.tol, meta=_meta(args.threads, total)))
    failed = [r for r in results if r.status == "FAIL"]
    print(f"{len(results)} models, {len(failed)} failed, "
          f"{sum(r.status == 'excluded' for r in results)} excluded, {total:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

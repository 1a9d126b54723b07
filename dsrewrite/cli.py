"""The ``dsrewrite`` command line: parse, call the API, print. No logic lives here.

Exit codes: 0 success, 1 the rewrite itself failed, 2 bad usage or input.

Example:
    >>> from click.testing import CliRunner
    >>> r = CliRunner().invoke(main, ["recipes"])
    >>> r.exit_code, "decoder_only" in r.output
    (0, True)
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import click

from .errors import DsRewriteError, TrustedPickleWarning, UsageError

__all__ = ["main", "CliError"]


def _parse_shape(_ctx: Any, _param: Any, value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        shape = tuple(int(s) for s in value.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,3,512,512")
    if len(shape) < 3 or any(s <= 0 for s in shape):
        raise click.BadParameter(f"{value!r} must have at least 3 positive dimensions, e.g. 1,3,512,512")
    return shape


def _progress(msg: str) -> None:
    """Progress on a terminal, silence when piped."""
    if sys.stderr.isatty():
        click.echo(msg, err=True)


class CliError(click.ClickException):
    """A failure as the command line shows it: ``error: MESSAGE`` (one line, plus an optional hint) and an exit code.

    ``exit_code`` is 2 for bad usage or input (:class:`~dsrewrite.errors.UsageError`), 1 for
    a failed rewrite (any other :class:`~dsrewrite.errors.DsRewriteError` or an unexpected
    exception). click prints it and exits with its code.

    Example:
        >>> CliError.of(UsageError("no such file")).exit_code, CliError.of(DsRewriteError("x")).exit_code
        (2, 1)
    """

    def __init__(self, message: str, exit_code: int, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.hint = hint

    @classmethod
    def of(cls, exc: BaseException) -> "CliError":
        """The CLI form of an exception raised by the API."""
        if isinstance(exc, DsRewriteError):
            return cls(str(exc), 2 if isinstance(exc, UsageError) else 1)
        return cls(f"the rewrite failed: {type(exc).__name__}: {exc}", 1,
                   hint="rerun with --debug for the traceback")

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)
        if self.hint:
            click.echo(f"hint: {self.hint}", err=True)


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn API errors into :class:`CliError` (``--debug`` prints the traceback first)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:  # DsRewriteError, or a bug / an unexpected torch failure
            if click.get_current_context().find_root().params.get("debug"):
                traceback.print_exc()
            raise CliError.of(exc) from exc

    return wrapper


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--state-dict-key", default=None,
                      help="Checkpoint entry holding the state dict (default: state_dict, model, ... in that order).")(fn)
    fn = click.option("--allow-global", "allow_globals", multiple=True, metavar="MODULE.NAME",
                      help="Admit one more plain type or function the model file names (repeatable).")(fn)
    fn = click.option("--allow-module", "allow_modules", multiple=True, metavar="PACKAGE",
                      help="Let the model file name classes of this package, importing it (repeatable).")(fn)
    fn = click.option("--trust-pickle", is_flag=True,
                      help="Load full-module pickles with plain torch.load (runs code from the file).")(fn)
    fn = click.option("--arch-arg", "arch_args", multiple=True, metavar="NAME=VALUE",
                      help="Keyword argument of the arch spec (--arch, or MODEL as a spec), value read as YAML; "
                           "repeatable, e.g. --arch-arg classes=3.")(fn)
    fn = click.option("--arch", default=None,
                      help="Architecture for a state-dict checkpoint: timm:NAME, torchvision:NAME, smp:ARCH[:ENCODER], "
                           "pkg.mod:factory.")(fn)
    fn = click.option("--example-inputs", "example_inputs", type=click.Path(dir_okay=False), default=None,
                      help="Example inputs saved with torch.save (a tensor, tuple or dict; read weights-only), "
                           "e.g. (sample, timestep) of a diffusion U-Net. Instead of --input-shape.")(fn)
    fn = click.option("--input-shape", callback=_parse_shape, default=None,
                      help="Example input shape, e.g. 1,3,512,512 (default 1,3,224,224); its channels and size "
                           "also shape the calibration images.")(fn)
    fn = click.argument("model")(fn)
    return fn


class _RegistryChoice(click.Choice):
    """Choices read from a registry whenever click asks (entries may be registered after import)."""

    def __init__(self, read: Callable[[], Sequence[str]]) -> None:
        self._read = read
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> Sequence[str]:
        return tuple(self._read())

    @choices.setter
    def choices(self, _value: Any) -> None:  # click.Choice.__init__ assigns; the registry is the source
        pass


def _orders() -> Sequence[str]:
    from .recipe.choices import order_choices

    return order_choices()


def _inits() -> Sequence[str]:
    from .recipe.choices import INITS

    return INITS


def _presets() -> Sequence[str]:
    from .calib_data import PRESETS

    return tuple(PRESETS)


def _save_formats() -> Sequence[str]:
    from .io.save import SAVE_FORMATS

    return SAVE_FORMATS


def _check_report_path(_ctx: Any, _param: Any, value: Optional[str]) -> Optional[str]:
    """A report path's suffix must name a registered format: checked before any work."""
    if value is not None:
        from .report import check_report_path

        try:
            check_report_path(value)
        except DsRewriteError as exc:
            raise CliError.of(exc) from exc
    return value


def _recipe_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--init", type=_RegistryChoice(_inits), default=None,
                      help="Override the recipe's init.")(fn)
    fn = click.option("--order", type=_RegistryChoice(_orders), default=None,
                      help="Override the recipe's order: a replacement kind, or auto.")(fn)
    fn = click.option("--depth-multiplier", type=click.IntRange(min=1), default=None,
                      help="Override the recipe's depth multiplier (or energy threshold).")(fn)
    fn = click.option("--recipe", "recipe", required=True, help="Built-in recipe name or path to a YAML recipe.")(fn)
    return fn


def _load(model: str, arch: Optional[str], arch_args: Sequence[str], trust_pickle: bool,
          **load_options: Any) -> Any:
    from .io import load_model
    from .io.arch import parse_arch_args

    args = parse_arch_args(arch_args)
    _progress(f"loading {model} ...")
    with _trust_warnings():
        return load_model(model, arch=arch, arch_args=args, trust_pickle=trust_pickle, **load_options)


@contextlib.contextmanager
def _trust_warnings() -> Iterator[None]:
    """Print a --trust-pickle warning as one ``warning:`` line (also when the load then fails); other
    warnings pass through."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TrustedPickleWarning)
            yield
    finally:
        for w in caught:
            if issubclass(w.category, TrustedPickleWarning):
                click.echo(f"warning: {w.message}", err=True)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _inputs(loaded: Any, input_shape: Optional[Sequence[int]], example_inputs: Optional[str]
            ) -> tuple[Any, Optional[tuple[int, ...]]]:
    from .calib_data import example_inputs_for

    if input_shape is None and example_inputs is None:
        input_shape = getattr(loaded, "input_shape", None)  # the model's own default (the demo's), if any
    return example_inputs_for(loaded.model, input_shape=input_shape, path=example_inputs)


def _make_plan(loaded: Any, recipe: str, x: Any, input_shape: Optional[Sequence[int]], *, must_replace: bool = True,
               **overrides: Any) -> Any:
    from .api import plan_rewrite

    return plan_rewrite(loaded.model, recipe, x, input_shape=input_shape, source=loaded.source,
                        source_spec=getattr(loaded, "source_spec", "MODEL"), progress=_progress,
                        must_replace=must_replace, **overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="dsrewrite")
def main(debug: bool) -> None:
    """Swap dense k×k convs of a trained PyTorch model for depthwise-separable ones.

    MODEL is a file written by torch.save(model), a state-dict checkpoint with --arch,
    an architecture spec (timm:resnet18, torchvision:resnet18, smp:Unet:resnet18, pkg.mod:factory;
    constructor arguments with --arch-arg NAME=VALUE), or
    `demo` (an embedded U-Net with a ResNet18 encoder, random weights).
    """


@main.command()
@_model_options
@_recipe_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output file (default: MODEL.ds.pt beside the input). A .plan.json is written beside it.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, callback=_check_report_path,
              help="Write the report; its suffix picks the format: .json, .md (Markdown), .txt (the table), "
                   ".png (plot), or one registered with dsrewrite.report.register_renderer.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG bar chart of per-layer MACs before/after.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration data: a folder of images/.npy arrays (recursive; png jpg jpeg bmp tif tiff webp) "
                   "or a tensor file (.pt, .npy, .npz). See docs/data.md.")
@click.option("--calib-size", default=None, help="Resize calibration images to H,W (default: the input shape's).")
@click.option("--calib-preset", type=_RegistryChoice(_presets), default=None,
              help="Normalisation of calibration images (default: imagenet for 3 channels, none otherwise; "
                   "overridden by --calib-mean/--calib-std).")
@click.option("--calib-mean", default=None, help="Per-channel mean (1 or C values), e.g. 0.485,0.456,0.406.")
@click.option("--calib-std", default=None, help="Per-channel std (1 or C values), e.g. 0.229,0.224,0.225.")
@click.option("--calib-limit", type=click.IntRange(min=1), default=64, show_default=True,
              help="Use at most this many calibration samples (only these are decoded).")
@click.option("--calib-activation", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: fit blocks whose conv feeds a (BatchNorm +) ReLU through that ReLU; none: linear fit only.")
@click.option("--benchmark", is_flag=True, help="Measure latency before/after (interleaved, medians).")
@click.option("--dry-run", is_flag=True, help="Plan and report, write nothing.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--save-format", type=_RegistryChoice(_save_formats), default=None,
              help="torch: the full module (default); safetensors: the weights only, reloaded with --arch and "
                   "the plan sidecar. Default: from -o's suffix.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@_handle_errors
def apply(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
          arch_args: tuple[str, ...], trust_pickle: bool, recipe: str,
          depth_multiplier: Optional[int], order: Optional[str], init: Optional[str], output: Optional[str],
          report_path: Optional[str], plot_path: Optional[str], calib: Optional[str], calib_size: Optional[str],
          calib_preset: Optional[str], calib_mean: Optional[str], calib_std: Optional[str], calib_limit: int,
          calib_activation: str, benchmark: bool, dry_run: bool, force: bool, as_json: bool,
          save_format: Optional[str], **load_options: Any) -> None:
    """Rewrite MODEL with a recipe, save it, and print what changed and what it bought."""
    from .io import check_output_path, default_output_path, plan_path_for, save_rewrite
    from .report import render_table, save_plot, save_report

    if save_format is None:
        save_format = "safetensors" if output and Path(output).suffix == ".safetensors" else "torch"
    out_path = Path(output) if output else default_output_path(model)
    if not output and save_format == "safetensors":
        out_path = out_path.with_suffix(".safetensors")
    if save_format == "safetensors" and out_path.suffix != ".safetensors":
        raise UsageError(f"-o {out_path}: --save-format safetensors needs a .safetensors output name.")
    input_path = Path(model) if Path(model).exists() else None
    if not dry_run:
        check_output_path(out_path, input_path=input_path, force=force)
        check_output_path(plan_path_for(out_path), input_path=input_path, force=force)
    for extra in (report_path, plot_path):
        if extra:
            check_output_path(Path(extra), input_path=input_path, force=True)
    loaded = _load(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = _inputs(loaded, input_shape, example_inputs)
    calib_data = None
    if calib:
        from .calib_data import open_calibration

        calib_data = open_calibration(calib, input_shape=shape, size=calib_size, preset=calib_preset,
                                      mean=calib_mean, std=calib_std, limit=calib_limit)
    p = _make_plan(loaded, recipe, x, shape, depth_multiplier=depth_multiplier, order=order, init=init)
    from .api import rewrite_with_plan

    _progress(f"rewriting {len(p.replaced)} convs" + (" and calibrating ..." if calib_data else " ..."))
    result = rewrite_with_plan(loaded.model, p, x, calibration=calib_data.loader if calib_data else None,
                               calibration_options={"activation": calib_activation}, benchmark=benchmark,
                               task_metric=loaded.task_metric)
    rep = result.report
    if calib_data is not None:
        click.echo(f"calibration data: {calib_data.describe()}", err=True)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        click.echo(render_table(rep))
    # The model and its plan first (both or neither): a failed write leaves no output at all.
    if not dry_run:
        weights, plan_file = save_rewrite(result.model, p, out_path, force=force, input_path=input_path,
                                          save_format=save_format, arch=loaded.arch)
        click.echo(f"wrote {weights} and {plan_file}", err=True)
    if report_path:
        save_report(rep, report_path)
    if plot_path:
        save_plot(rep, plot_path)
    if dry_run:
        click.echo("dry run: model not written", err=True)


@main.command("plan")
@_model_options
@_recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan report as JSON on stdout.")
@_handle_errors
def plan_cmd(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
             arch_args: tuple[str, ...], trust_pickle: bool, recipe: str, depth_multiplier: Optional[int], order: Optional[str],
             init: Optional[str], as_json: bool, **load_options: Any) -> None:
    """Dry run: explain, for every candidate conv, whether it would be replaced and why."""
    from .report import build_plan_report, render_plan, render_table

    loaded = _load(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = _inputs(loaded, input_shape, example_inputs)
    p = _make_plan(loaded, recipe, x, shape, must_replace=False, depth_multiplier=depth_multiplier, order=order,
                   init=init)
    rep = build_plan_report(loaded.model, p, x)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        click.echo(render_plan(p))
        click.echo()
        click.echo(render_table(rep))
    if not p.replaced:
        click.echo(f"note: recipe {recipe!r} selects no conv ({len(p.entries)} candidates); each one's reason is "
                   "in the table above.", err=True)


@main.command()
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print the inventory as JSON on stdout.")
@_handle_errors
def inspect(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
            arch_args: tuple[str, ...], trust_pickle: bool, as_json: bool, **load_options: Any) -> None:
    """List every conv with its graph facts: the names and facts to write a recipe with."""
    from .capture import capture
    from .report import build_inventory, render_inventory

    loaded = _load(model, arch, arch_args, trust_pickle, **load_options)
    x, _ = _inputs(loaded, input_shape, example_inputs)
    _progress("capturing the graph ...")
    cap = capture(loaded.model, x)
    inv = build_inventory(loaded.model, cap, x)
    if as_json:
        click.echo(json.dumps(inv, indent=2))
    else:
        click.echo(render_inventory(inv))


@main.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the built-in recipes (``recipes show NAME`` prints one)."""
    if ctx.invoked_subcommand is None:
        from .recipe import builtin_recipes

        items = builtin_recipes()
        width = max(len(n) for n in items)
        for name, desc in items.items():
            click.echo(f"{name:<{width}}  {desc}")


@recipes.command("show")
@click.argument("name")
@_handle_errors
def recipes_show(name: str) -> None:
    """Print a built-in recipe (or a recipe file) as YAML."""
    from .recipe import builtin_recipe_path, load_recipe

    path = Path(name) if Path(name).exists() else builtin_recipe_path(name)
    load_recipe(str(path))  # validate
    click.echo(path.read_text(encoding="utf-8"), nl=False)


@main.command()
@_model_options
@click.option("--rewritten", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The rewritten model written by `dsrewrite apply`.")
@click.option("--data", required=True, type=click.Path(),
              help="Unlabeled data, all of it used and streamed: a folder of images/.npy arrays (recursive), a "
                   "tensor file (.pt, .npy, .npz), or 'demo' (the demo's generated images). See docs/data.md.")
@click.option("--calib-size", default=None, help="Resize images to H,W (default: the input shape's).")
@click.option("--calib-preset", type=_RegistryChoice(_presets), default=None,
              help="Normalisation of images (default: imagenet for 3 channels, none otherwise).")
@click.option("--calib-mean", default=None, help="Per-channel mean (1 or C values).")
@click.option("--calib-std", default=None, help="Per-channel std (1 or C values).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint file (written at the end; with --resume, continued from).")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Where to write the healed model.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@_handle_errors
def heal(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
         arch_args: tuple[str, ...], trust_pickle: bool, rewritten: str, data: str, calib_size: Optional[str], calib_preset: Optional[str],
         calib_mean: Optional[str], calib_std: Optional[str], steps: int, lr: float, batch_size: int,
         checkpoint: Optional[str], resume: bool, output: str, force: bool, **load_options: Any) -> None:
    """Distil the original MODEL into the rewritten model for a few steps (no labels)."""
    from .calib_data import open_calibration
    from .heal import heal as heal_fn
    from .io import atomic_save, check_output_path, load_model

    inputs = [Path(rewritten)] + ([Path(model)] if Path(model).exists() else [])
    outputs = [Path(output)] + ([Path(checkpoint)] if checkpoint and not resume else [])
    for out in outputs:  # every output checked before any work: never an input, never clobbered silently
        for inp in inputs:
            check_output_path(out, input_path=inp, force=force)
    if checkpoint and Path(checkpoint).resolve() == Path(output).resolve():
        raise UsageError(f"--checkpoint {checkpoint} is also -o: the checkpoint and the healed model need two files.")
    loaded = _load(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = _inputs(loaded, input_shape, example_inputs)
    with _trust_warnings():
        student = load_model(rewritten, trust_pickle=trust_pickle, allow_modules=load_options["allow_modules"],
                             allow_globals=load_options["allow_globals"]).model
    source = open_calibration(data, input_shape=shape, size=calib_size, preset=calib_preset, mean=calib_mean,
                              std=calib_std, batch_size=batch_size)
    metric = loaded.task_metric  # the demo's held-out mIoU; None for a user's model
    before = metric(student) if metric is not None else None
    result = heal_fn(student, loaded.model, source.loader, steps=steps, lr=lr, checkpoint=checkpoint,
                     resume=resume, progress=sys.stderr.isatty(), example_inputs=x)
    atomic_save(student, Path(output))
    hist = getattr(result, "losses", None) or []
    if hist:
        click.echo(f"distillation loss {hist[0]:.4g} -> {hist[-1]:.4g} over {len(hist)} steps "
                   f"({result.images} samples drawn from the {source.count} in {data})")
    if metric is not None:
        click.echo(f"task metric {metric.name}: original {metric(loaded.model):.2f}; rewritten {before:.2f} → "
                   f"healed {metric(student):.2f}")
    click.echo(f"wrote {output}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()

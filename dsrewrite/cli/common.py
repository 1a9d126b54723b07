# SPDX-License-Identifier: Apache-2.0
"""What every ``dsrewrite`` command shares: option groups, input parsing, loading, and the error mapping.

Exit codes: 0 success, 1 the rewrite itself failed, 2 bad usage or input (see :class:`CliError`).
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import click

from ..errors import DsRewriteError, TrustedPickleWarning, UsageError

#: dsrewrite.recipe.replace_keys.MAX_DEPTH_MULTIPLIER (not imported: the CLI starts without torch); a test keeps them equal.
MAX_DEPTH_MULTIPLIER = 4096


def parse_shape(_ctx: Any, _param: Any, value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        shape = tuple(int(s) for s in value.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,3,512,512")
    if len(shape) < 3 or any(s <= 0 for s in shape):
        raise click.BadParameter(f"{value!r} must have at least 3 positive dimensions, e.g. 1,3,512,512")
    return shape


def positive_float(_ctx: Any, param: Any, value: Optional[float]) -> Optional[float]:
    """A finite number > 0 (``--lr``): NaN, inf, 0 and negatives are refused."""
    if value is not None and not (0 < value < float("inf")):
        raise click.BadParameter(f"{value!r} must be a finite number > 0, e.g. 1e-4")
    return value


def progress(msg: str) -> None:
    """Progress through the ``dsrewrite`` logger: shown on a terminal or with -v, silent when piped or -q."""
    from ..runtime.log import get_logger

    get_logger("cli").info(msg)


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


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
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


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
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
    fn = click.option("--input-shape", callback=parse_shape, default=None,
                      help="Example input shape, e.g. 1,3,512,512 (default 1,3,224,224); its channels and size "
                           "also shape the calibration images.")(fn)
    fn = click.argument("model")(fn)
    return fn


class RegistryChoice(click.Choice):
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


def orders() -> Sequence[str]:
    from ..recipe.choices import order_choices

    return order_choices()


def inits() -> Sequence[str]:
    from ..recipe.choices import INITS

    return INITS


def presets() -> Sequence[str]:
    from ..refit.choices import PRESETS  # torch-free: `--help` stays light

    return tuple(PRESETS)


def save_formats() -> Sequence[str]:
    from ..io.save import SAVE_FORMATS

    return SAVE_FORMATS


def check_report_path(_ctx: Any, _param: Any, value: Optional[str]) -> Optional[str]:
    """A report path's suffix must name a registered format: checked before any work."""
    if value is not None:
        from ..report import check_report_path

        try:
            check_report_path(value)
        except DsRewriteError as exc:
            raise CliError.of(exc) from exc
    return value


def recipe_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--init", type=RegistryChoice(inits), default=None,
                      help="Override the recipe's init.")(fn)
    fn = click.option("--order", type=RegistryChoice(orders), default=None,
                      help="Override the recipe's order: a replacement kind, or auto.")(fn)
    fn = click.option("--depth-multiplier", type=click.IntRange(min=1, max=MAX_DEPTH_MULTIPLIER), default=None,
                      help="Override the recipe's depth multiplier (or energy threshold).")(fn)
    fn = click.option("--recipe", "recipe", required=True, help="Built-in recipe name or path to a YAML recipe.")(fn)
    return fn


def load_model_arg(model: str, arch: Optional[str], arch_args: Sequence[str], trust_pickle: bool,
          **load_options: Any) -> Any:
    from ..io import load_model
    from ..io.arch import parse_arch_args

    args = parse_arch_args(arch_args)
    progress(f"loading {model} ...")
    with trust_warnings():
        return load_model(model, arch=arch, arch_args=args, trust_pickle=trust_pickle, **load_options)


@contextlib.contextmanager
def trust_warnings() -> Iterator[None]:
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


def example_inputs_of(loaded: Any, input_shape: Optional[Sequence[int]], example_inputs: Optional[str]
            ) -> tuple[Any, Optional[tuple[int, ...]]]:
    from ..calib_data import example_inputs_for

    if input_shape is None and example_inputs is None:
        input_shape = getattr(loaded, "input_shape", None)  # the model's own default (the demo's), if any
    return example_inputs_for(loaded.model, input_shape=input_shape, path=example_inputs)


def make_plan(loaded: Any, recipe: str, x: Any, input_shape: Optional[Sequence[int]], *, must_replace: bool = True,
               **overrides: Any) -> Any:
    from ..api import plan_rewrite

    return plan_rewrite(loaded.model, recipe, x, input_shape=input_shape, source=loaded.source,
                        source_spec=getattr(loaded, "source_spec", "MODEL"), progress=progress,
                        must_replace=must_replace, **overrides)

# SPDX-License-Identifier: Apache-2.0
"""The ``dsrewrite`` command line: parse, call the API, print. No logic lives here.

Exit codes: 0 success, 1 the rewrite itself failed, 2 bad usage or input.

Example:
    >>> from click.testing import CliRunner
    >>> r = CliRunner().invoke(main, ["recipes"])
    >>> r.exit_code, "decoder_only" in r.output
    (0, True)
"""

from __future__ import annotations

import click

from .apply import apply
from .common import CliError
from .export import export_cmd
from .heal import heal
from .plan import inspect, plan_cmd, recipes
from ..runtime.log import configure_cli, reset_cli

__all__ = ["main", "CliError"]


class _OneLineGroup(click.Group):
    """click's usage errors (a bad option value, a missing argument) as one ``error:`` line and exit 2,
    like every other bad input, instead of click's four-line usage block."""

    @staticmethod
    def _one_line(exc: click.UsageError) -> CliError:
        where = exc.ctx.command_path if exc.ctx is not None else "dsrewrite"
        return CliError(f"{exc.format_message()} (see '{where} --help')", 2)

    def make_context(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise self._one_line(exc) from exc

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise self._one_line(exc) from exc


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="Show progress even when stderr is not a terminal (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Show no progress, only warnings and errors.")
@click.version_option(package_name="dsrewrite")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int, quiet: bool) -> None:
    """Swap dense k×k convs of a trained PyTorch model for depthwise-separable ones.

    MODEL is a file written by torch.save(model), a state-dict checkpoint with --arch,
    an architecture spec (timm:resnet18, torchvision:resnet18, smp:Unet:resnet18, pkg.mod:factory;
    constructor arguments with --arch-arg NAME=VALUE), or
    `demo` (an embedded U-Net with a ResNet18 encoder, random weights).

    Progress goes to stderr on a terminal (or with -v); under torchrun only rank 0 shows it.
    """
    configure_cli(-1 if quiet else verbose)
    ctx.call_on_close(reset_cli)


for _command in (apply, plan_cmd, inspect, recipes, heal, export_cmd):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()

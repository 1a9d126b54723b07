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

__all__ = ["main", "CliError"]


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


for _command in (apply, plan_cmd, inspect, recipes, heal, export_cmd):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()

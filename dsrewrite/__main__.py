# SPDX-License-Identifier: Apache-2.0
"""``python -m dsrewrite`` runs the ``dsrewrite`` command (and so ``torchrun ... -m dsrewrite heal ...`` works).

Example (a shell)::

    python -m dsrewrite --help
    torchrun --nproc_per_node=2 --standalone -m dsrewrite heal model.pt --rewritten model.ds.pt --data images/ -o healed.pt
"""

from dsrewrite.cli import main

if __name__ == "__main__":
    main(prog_name="dsrewrite")

# SPDX-License-Identifier: Apache-2.0
"""The built-in graph predicates: after a concat, after an upsample, downstream of an upsample, final predictor.

"Comes from" looks through the transparent nodes of :mod:`dsrewrite.graph_vocab` (norms,
element-wise activations, dropout, identity, casts, channel-keeping pads/crops, gates);
a concatenation counts only along the channel dimension. Each ``holds(view, node)`` reads
one conv call site ``node`` of a ``GraphView``.

Example:
    >>> [p.column for p in (AfterConcat(), AfterUpsample(), DownstreamOfUpsample(), FinalPredictor(), AfterBottleneck())]
    ['cat', 'up', '↓up', 'final', '↓btl']
"""

from __future__ import annotations

from typing import Any

__all__ = ["AfterConcat", "AfterUpsample", "DownstreamOfUpsample", "FinalPredictor", "AfterBottleneck"]


class AfterConcat:
    """The conv's input comes from a channel concatenation (through transparent nodes)."""

    name = "after_concat"
    description = ("The conv reads a torch.cat along the channel dim (through norm/activation/dropout/pad/crop/"
                   "casts/gates).")
    phrase, short = "after a concat", "after concat"
    column, legend = "cat", "after concat"

    def holds(self, view: Any, node: Any) -> bool:
        return view.source_of(node) in view.cat_inputs


class AfterUpsample:
    """The conv's input comes from an upsample, directly or through a concat with an upsampled input."""

    name = "after_upsample"
    description = "The conv reads an upsample (through a channel concat and norm/activation/dropout/pad/crop/casts)."
    phrase, short = "right after an upsample", "after upsample"
    column, legend = "up", "after upsample"

    def holds(self, view: Any, node: Any) -> bool:
        src = view.source_of(node)
        if src is None:
            return False
        if src in view.upsample:
            return True
        return src in view.cat_inputs and any(view.source(i) in view.upsample for i in view.cat_inputs[src])


class DownstreamOfUpsample:
    """Some upsample lies on some path from the model input to the conv."""

    name = "downstream_of_upsample"
    description = "Some upsample runs before the conv in the graph."
    phrase, short = "downstream of an upsample", "downstream of upsample"
    column, legend = "↓up", "downstream of upsample"

    def holds(self, view: Any, node: Any) -> bool:
        return view.downstream_of_upsample(node)


class FinalPredictor:
    """The conv's output reaches a model output through no further conv or linear layer.

    Read from the eager run's autograd graph (:mod:`dsrewrite.planning.final`), so it is
    known even when no graph capture succeeds; the capture puts the answer in ``view.final``.
    """

    name = "final_predictor"
    description = "The conv's output reaches a model output through no further conv/linear layer (a final predictor)."
    phrase = "a final predictor (its output reaches a model output through no further conv/linear)"
    short = "final predictor"
    column, legend = "final", "final predictor (no conv/linear between it and an output)"
    #: where the eager run gave no gradients (see the capture's notes), a conv is taken as no final predictor
    when_unknown = False

    def holds(self, view: Any, node: Any) -> bool:
        return id(view.conv_module[node]) in view.final


class AfterBottleneck:
    """The conv runs after the encoder's deepest point: the decoder, read from the graph where names say nothing.

    The deepest point (bottleneck) is the last conv site, in graph order, whose output has the
    smallest spatial size (global-context convs with a 1×1 output aside); the convs downstream
    of it are the decoder. A classifier has none.
    """

    name = "after_bottleneck"
    description = ("The conv runs downstream of the encoder's deepest point (the last conv at the smallest "
                   "spatial size).")
    phrase, short = "after the bottleneck", "after bottleneck"
    column, legend = "↓btl", "downstream of the bottleneck (the deepest point)"

    def holds(self, view: Any, node: Any) -> bool:
        return view.after_bottleneck(node)

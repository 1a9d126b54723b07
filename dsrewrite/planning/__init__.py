# SPDX-License-Identifier: Apache-2.0
"""Planning: from a model to a plan, and the plan carried out.

* :mod:`~dsrewrite.planning.capture`: the graph (fx, then ``torch.export``, then names) → facts;
* :mod:`~dsrewrite.planning.planner`: facts + recipe → :class:`~dsrewrite.planning.types.Plan`;
* :mod:`~dsrewrite.planning.types`: ``LayerConfig``, ``PlanEntry``, ``Plan`` (a value, JSON round trip);
* :mod:`~dsrewrite.planning.apply`: ``apply_plan`` (the convs swapped for the blocks their kinds build).
"""

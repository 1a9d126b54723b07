# SPDX-License-Identifier: Apache-2.0
"""Budgets: say the cost, get the most accurate plan that fits it (see docs/budget.md)."""

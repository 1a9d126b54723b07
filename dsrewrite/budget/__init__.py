"""Budgets: say the cost, get the most accurate plan that fits it (see docs/budget.md)."""

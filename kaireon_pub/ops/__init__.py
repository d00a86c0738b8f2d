"""Operator tools: `status`, `requeue`, `check`, `top`, and the backlog gauges the workers refresh."""

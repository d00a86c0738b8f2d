"""Proving delivery: reading records back from the broker at the positions the marks recorded,
and comparing them with the rows (`locate`, `audit`, the continuous auditor)."""

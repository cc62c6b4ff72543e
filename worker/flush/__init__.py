"""Flush: the fenced protocol for one pair (protocol), which pairs are due and their fan-out
(due), and plan accumulator pushes (plans)."""

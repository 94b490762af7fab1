"""Operator commands behind `python -m sluicegate`; each module exposes `main(argv) -> int`."""

"""Tiny dotted-path pattern matching: ``*`` matches exactly one path component."""

from __future__ import annotations


def match(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(a == "*" or a == b for a, b in zip(p, n, strict=True))

"""Triton kernels for lorakit's cuda-triton backend (imported lazily; triton is optional)."""

from __future__ import annotations


def triton_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a triton version string ("3.6.0", "3.6.0+git1a2b"), None where it cannot be read. Pure:
    the backend checks the release before any kernel module imports triton."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None

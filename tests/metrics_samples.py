"""Reading this process's Prometheus registry in tests."""

from __future__ import annotations

from prometheus_client import REGISTRY

Key = str | tuple[str, dict[str, str]]
"""A sample's name, or its name and labels."""


def value(name: str, **labels: str) -> float:
    """The sample's value now (0 while it does not exist)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Samples:
    """Some samples, and how much each changed since this was made (the registry is the
    process's own, shared by every test)."""

    def __init__(self, *keys: Key) -> None:
        self._keys = [(key, {}) if isinstance(key, str) else key for key in keys]
        self._before = self._now()

    def _now(self) -> list[float]:
        return [value(name, **labels) for name, labels in self._keys]

    def changes(self) -> list[float]:
        return [now - before for now, before in zip(self._now(), self._before, strict=True)]

"""Reading typed settings from the environment, failing fast on bad values.

Every service's frozen config dataclass reads its fields through these, so a
typo such as RANKING_WORKERS=four stops the process at start with a message
naming the variable instead of surfacing later as a confusing failure.
"""
from __future__ import annotations

import os
from collections.abc import Mapping


class ConfigError(ValueError):
    pass


class EnvReader:
    def __init__(self, prefix: str, environ: Mapping[str, str] | None = None):
        self.prefix = prefix
        self.environ = os.environ if environ is None else environ

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(self.prefix + name)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, name: str, default: str) -> str:
        value = self._raw(name)
        return default if value is None else value

    def host_ports(self, name: str) -> tuple[str, ...]:
        """host:port entries, comma-separated (a Redis Cluster's seed nodes); unset: none."""
        nodes = tuple(node.strip() for node in (self._raw(name) or "").split(",") if node.strip())
        for node in nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{self.prefix}{name}: {node!r} is not host:port")
        return nodes

    def optional_path(self, name: str, default: str) -> str:
        """A directory setting where set-but-empty means "none" (unset means the default)."""
        value = self.environ.get(self.prefix + name)
        if value is None:
            return default
        return value.strip()

    def int(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._raw(name)
        if value is None:
            result = default
        else:
            try:
                result = int(value)
            except ValueError:
                raise ConfigError(f"{self.prefix}{name}={value!r} is not an integer") from None
        self._check_range(name, result, minimum, maximum)
        return result

    def optional_int(self, name: str, minimum: int | None = None, maximum: int | None = None) -> "int | None":
        """An integer setting that is absent unless set."""
        if self._raw(name) is None:
            return None
        return self.int(name, 0, minimum, maximum)

    def float(self, name: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
        value = self._raw(name)
        if value is None:
            result = default
        else:
            try:
                result = float(value)
            except ValueError:
                raise ConfigError(f"{self.prefix}{name}={value!r} is not a number") from None
        self._check_range(name, result, minimum, maximum)
        return result

    def bool(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.prefix}{name}={value!r} is not a boolean (true/false)")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(name, default)
        if value not in choices:
            raise ConfigError(f"{self.prefix}{name}={value!r} must be one of {', '.join(choices)}")
        return value

    def _check_range(self, name, value, minimum, maximum) -> None:
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.prefix}{name}={value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.prefix}{name}={value} is above the maximum {maximum}")

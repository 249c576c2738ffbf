"""`setting`: a dataclass field that carries its own help text, so that flags and `--help` are generated from
the one declaration (`TrainConfig`, `AugmentConfig`)."""
from __future__ import annotations

from dataclasses import MISSING, Field, field
from typing import Any


def setting(default: Any = MISSING, *, help: str, group: str = "run", shown: str | None = None,
            flag: str | None = None, metavar: str | None = None, aliases: tuple[str, ...] = (),
            default_factory: Any = MISSING) -> Any:
    """A config field with its help text and the flag group it is shown in. `shown`: the default in words
    where its value says too little (None -> "none"). `flag`: the flag when it is not `--<name>` (or
    `--no-<name>` for a setting that is on by default); "" for a recipe-only setting. `aliases`: older
    flag names, accepted but not shown."""
    metadata = {"help": help, "group": group, "shown": shown, "flag": flag, "metavar": metavar, "aliases": aliases}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_default(item: Field) -> Any:
    """A field's default value (a fresh one for default factories); MISSING when it has none."""
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    return MISSING

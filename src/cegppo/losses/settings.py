"""How a loss declares its settings: a small frozen dataclass whose fields are made with :func:`setting`.

Each field carries its default, the rule it must satisfy and where verl keeps the key (the ``actor`` config,
its ``policy_loss`` section, or ``algorithm.rollout_correction``). Declaring the dataclass with the registry
(``register_policy_loss(name, settings=...)``) makes each field a setting of :class:`PolicyLossConfig`, a key of the
run config at that place, and a keyword of the verl plug-in: one declaration, one default, one rule.

>>> @dataclass(frozen=True)
... class CEGPPOSettings(LossSettings):
...     beta1: float = setting(0.5, at_least(0))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

# Where verl keeps a setting: on its actor config, in the actor's policy_loss section, or in
# algorithm.rollout_correction (verl passes the last to the loss as config.policy_loss.rollout_correction).
ACTOR = "actor"
POLICY_LOSS = "policy_loss"
ROLLOUT_CORRECTION = "rollout_correction"
PLACES = (ACTOR, POLICY_LOSS, ROLLOUT_CORRECTION)
_SETTING = "cegppo.setting"  # the dataclass field metadata key of a setting's declaration


class SettingError(ValueError):
    """A setting whose value breaks its rule; ``name`` is the name a loss reads it under."""

    def __init__(self, name: str, value: object, rule: str) -> None:
        super().__init__(f"PolicyLossConfig.{name}={value!r} is invalid: {rule}")
        self.name, self.value, self.rule = name, value, rule


@dataclass(frozen=True)
class Rule:
    """What a setting's value must satisfy, and the words an error says it in."""

    test: Callable[[Any], bool]
    text: str


def is_real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(bound: float) -> Rule:
    return Rule(lambda v: is_real(v) and v >= bound, f"must be a finite number >= {bound}")


def above(bound: float, text: str | None = None) -> Rule:
    return Rule(lambda v: is_real(v) and v > bound, text or f"must be a finite number > {bound}")


def fraction() -> Rule:
    return Rule(lambda v: is_real(v) and 0 < v <= 1, "must be a fraction in (0, 1]")


def one_of(values: Collection[object]) -> Rule:
    return Rule(lambda v: v in values, f"allowed values are {list(values)}")


@dataclass(frozen=True)
class Declaration:
    rule: Rule | None
    place: str
    key: str | None  # the key at its place when it is not the field's name (verl's spelling)
    required: bool  # None (unset) is allowed by the type, but the loss needs a value


def setting(
    default: Any,
    rule: Rule | None = None,
    *,
    at: str = POLICY_LOSS,
    key: str | None = None,
    required: bool = False,
) -> Any:
    """A settings-dataclass field: its default, its rule (checked unless the value is None and the field's type
    allows None), its place in verl's (and the run config's) layout and its key there, and whether the loss needs
    it set although its default is None."""
    if at not in PLACES:
        raise ValueError(f"setting(at={at!r}): places are {list(PLACES)}")
    return dataclasses.field(default=default, metadata={_SETTING: Declaration(rule, at, key, required)})


@dataclass(frozen=True)
class LossSettings:
    """Base of a settings dataclass: every field made with :func:`setting` is checked on construction, then
    :meth:`check` checks the rules between fields."""

    def __post_init__(self) -> None:
        for name, (declaration, optional) in _declarations(type(self)).items():
            value = getattr(self, name)
            if declaration.rule is None or (value is None and optional):
                continue
            if not declaration.rule.test(value):
                raise SettingError(name, value, declaration.rule.text)
        self.check()

    def check(self) -> None:
        """Rules between this dataclass's fields (raise :class:`SettingError`); none by default."""


@functools.cache
def _declarations(cls: type) -> dict[str, tuple[Declaration, bool]]:
    """Each field's declaration, and whether its type allows None."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if _SETTING not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} must be declared with cegppo.losses.setting(...)")
        hint = hints[f.name]
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        found[f.name] = (f.metadata[_SETTING], is_union and type(None) in typing.get_args(hint))
    return found


@dataclass(frozen=True)
class Declared:
    """One declared setting: the name a loss reads (``config.<name>``), the dataclass that declares it, its place
    and key in verl's layout, its declared type and default, and whether the loss needs it set."""

    name: str
    owner: type[LossSettings]
    place: str
    key: str
    type: Any
    default: Any
    required: bool


_DECLARED: dict[str, Declared] = {}


def declare(cls: type[LossSettings]) -> type[LossSettings]:
    """Add the settings of ``cls`` to the ones :class:`PolicyLossConfig` holds; a name another dataclass declares
    already is an error (a redefinition of the same dataclass, e.g. a re-run notebook cell, replaces it)."""
    if not (isinstance(cls, type) and issubclass(cls, LossSettings) and dataclasses.is_dataclass(cls)):
        raise TypeError(
            f"loss settings must be a dataclass subclassing cegppo.losses.LossSettings, got {cls!r} (a loss "
            "declares its settings as fields made with cegppo.losses.setting(...))"
        )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        declaration, _ = _declarations(cls)[f.name]
        existing = _DECLARED.get(f.name)
        if existing is not None and _identity(existing.owner) != _identity(cls):
            raise ValueError(
                f"setting {f.name!r} of {cls.__name__} is declared by {existing.owner.__name__} already: reuse "
                "that dataclass (a loss may take several) or choose another name"
            )
        _DECLARED[f.name] = Declared(
            f.name,
            cls,
            declaration.place,
            declaration.key or f.name,
            hints[f.name],
            f.default,
            declaration.required,
        )
    return cls


def withdraw(cls: type[LossSettings]) -> None:
    """Remove the settings ``cls`` declares (its losses are unregistered)."""
    for name in [name for name, d in _DECLARED.items() if d.owner is cls]:
        del _DECLARED[name]


def _identity(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def declared_settings() -> dict[str, Declared]:
    """Every declared setting by name, in declaration order."""
    return dict(_DECLARED)


def find_setting(name: str) -> Declared | None:
    """The declared setting ``name``, or None."""
    return _DECLARED.get(name)


def settings_classes() -> tuple[type[LossSettings], ...]:
    """The dataclasses that declare the settings, each once, in declaration order."""
    return tuple(dict.fromkeys(d.owner for d in _DECLARED.values()))

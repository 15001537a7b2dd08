"""The base of every recipe section: frozen, unknown keys refused, field docstrings kept, and the
one way a section builds the config of the component it sets up (`Config.build`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator

T = TypeVar("T")


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    execution_only: ClassVar[frozenset[str]] = frozenset()
    """Fields that say how a stage runs (pool sizes, retries, tracking), not what it writes: they
    are left out of its fingerprint, so a resubmission may change them and still resume."""

    added_fields: ClassVar[Mapping[str, Any]] = {}
    """Fields this class gained after runs could already have been made with it, each with the
    value a `_fingerprint.json` written before the field existed is read as (in JSON form, as that
    file holds it): the value that does what the release without the field did, its default when
    it was added. A stage folder written by an older release then resumes while the field holds
    that value, and is refused (naming the field) when it holds another. The value is never
    updated: if a later release changes the field's default, the old folders still read as the
    old value, so the new default is refused there, as a change of behaviour must be. A field added
    at a default that does something new is not listed: old folders are refused, as they must be.
    A subclass inherits the fields its bases list."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        unknown = cls.execution_only - set(cls.model_fields)
        if unknown:  # a misspelt name would silently stay in the fingerprint
            raise TypeError(f"{cls.__name__}.execution_only names no field: {sorted(unknown)}")
        added = set(vars(cls).get("added_fields", {}))
        if added - set(cls.model_fields) or added & cls.execution_only:
            raise TypeError(
                f"{cls.__name__}.added_fields names no fingerprinted field: "
                f"{sorted(added - set(cls.model_fields) | added & cls.execution_only)}"
            )

    @model_validator(mode="before")
    @classmethod
    def _over_section_defaults(cls, data: Any) -> Any:
        """A nested section given in part (`transformer: {train: {workers: 64}}`) is the section's
        own default with those keys changed, not the generic defaults of its class: the
        transformer's trainer keeps the paper's learning rate, ZeRO stage, clipping and EMA."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            default, given = field.default, data.get(name)
            if isinstance(default, Config) and isinstance(given, dict):
                base = default.model_dump(exclude_unset=True)
                merged[name] = {**base, **given}
        return merged

    def fingerprinted(self) -> dict[str, Any]:
        """The section as JSON without its `execution_only` fields, nested sections included."""
        data = self.model_dump(mode="json")
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in self.execution_only:
                del data[name]
            elif isinstance(value, Config):
                data[name] = value.fingerprinted()
        return data

    def added_paths(self) -> dict[str, Any]:
        """Every `added_fields` entry of this section and of its nested sections, keyed by its path
        in `fingerprinted()` (`train.null_caption_prob`): what `Fingerprint.added` takes."""
        paths: dict[str, Any] = {}
        for klass in reversed(type(self).__mro__):
            paths.update(vars(klass).get("added_fields", {}))
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Config) and name not in self.execution_only:
                paths.update({f"{name}.{sub}": v for sub, v in value.added_paths().items()})
        return paths

    def execution_paths(self) -> set[str]:
        """The dotted paths of every `execution_only` field, nested sections included: a stored
        fingerprint written while one of them was still fingerprinted is read without it."""
        paths = set(self.execution_only)
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Config) and name not in self.execution_only:
                paths |= {f"{name}.{sub}" for sub in value.execution_paths()}
        return paths

    def build(self, cls: type[T], **given: Any) -> T:
        """The component config `cls` (a model's frozen dataclass): each of its fields from `given`,
        else from this section's field of the same name. A field with neither is a TypeError, so
        a field added to a model but not to its section cannot silently keep its default."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                values[f.name] = given[f.name]
            elif f.name in type(self).model_fields:
                values[f.name] = getattr(self, f.name)
            else:
                raise TypeError(f"{type(self).__name__} has no field {f.name!r} for {cls.__name__}, and none is given")
        return cls(**values)

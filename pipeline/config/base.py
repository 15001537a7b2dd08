"""The base of every recipe section: frozen, unknown keys refused, field docstrings kept, and the
one way a section builds the config of the component it sets up (`Config.build`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    execution_only: ClassVar[frozenset[str]] = frozenset()
    """Fields that say how a stage runs (pool sizes, retries, tracking), not what it writes: they
    are left out of its fingerprint, so a resubmission may change them and still resume."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        unknown = cls.execution_only - set(cls.model_fields)
        if unknown:  # a misspelt name would silently stay in the fingerprint
            raise TypeError(f"{cls.__name__}.execution_only names no field: {sorted(unknown)}")

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

"""The job spec's training fields as pydantic fields, generated from `dopsd.config`'s declarations.

Each public setting of `DOPSDConfig` becomes one field of `api.schemas.JobSpec` under its spec name, with the
library's bounds tightened by the service's (`Public.bounds`), its API description, and `None` ("the preset's")
as the default of a preset-defaulted field. Adding a field to the spec is adding a `public=Public(...)` setting.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, Field

from dopsd.config import Setting, config_values_from_spec, public_settings, replaced_defaults
from dopsd.presets import get_preset


def _spec_type(s: Setting) -> Any:
    public = s.declaration.public
    assert public is not None
    if public.type is not None:
        return public.type
    base = s.value_type
    if typing.get_origin(base) in (list, tuple):  # JSON has lists only
        item = typing.get_args(base)[0]
        item_bounds = s.declaration.items.tightened_by(public.items).as_kwargs()
        base = list[Annotated[item, Field(**item_bounds)]] if item_bounds else list[item]  # type: ignore[valid-type]
    if s.declaration.preset or s.type is not s.value_type:  # "the preset's", or a field that takes None
        return base | None
    return base


def _spec_default(s: Setting) -> dict[str, Any]:
    public = s.declaration.public
    assert public is not None
    if public.default_factory is not None:
        return {"default_factory": public.default_factory}
    if s.declaration.preset:
        return {"default": None}
    value = s.default_value()
    if isinstance(value, list | tuple | dict):  # made afresh per spec, like any mutable default
        made = list(value) if isinstance(value, tuple) else value
        return {"default_factory": lambda: type(made)(made)}
    return {"default": value}


def job_spec_fields() -> dict[str, Any]:
    """`create_model` field definitions of the spec's training fields: spec name -> (type, `Field`)."""
    fields: dict[str, Any] = {}
    for s in public_settings():
        public = s.declaration.public
        assert public is not None
        options: dict[str, Any] = {
            **_spec_default(s),
            **s.declaration.bounds.tightened_by(public.bounds).as_kwargs(),
            "description": public.description,
        }
        fields[s.spec_name] = (_spec_type(s), Field(**options))
    return fields


def training_values(spec: BaseModel) -> dict[str, Any]:
    """A parsed spec's training fields under their `DOPSDConfig` names, ready for `DOPSDConfig.for_preset`; a field
    the client left out takes its preset's replacement of the declared default (`dopsd.config.replaced_defaults`)."""
    names = {s.spec_name for s in public_settings()}
    values = config_values_from_spec(spec.model_dump(include=names))
    try:
        preset = get_preset(values["preset"])
    except ValueError:
        return values  # refused with its reason by the caller
    given = config_values_from_spec(spec.model_dump(include=names & spec.model_fields_set))
    return {**values, **replaced_defaults(preset, given)}

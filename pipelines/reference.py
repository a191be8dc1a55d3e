"""docs/recipe-reference.md, written from the schema: every section (stages in run order, from the registry), every
field with its type, default and description. ``python -m domainsynth.pipelines.reference > docs/recipe-reference.md``
rewrites it; tests/test_recipe_paths.py fails when the file is out of date."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .recipe import Recipe
from .schema import PathRole
from .stages import STAGES

HEADER = """# Recipe reference (generated)

Written from the recipe's schema by `python -m domainsynth.pipelines.reference`; do not edit by hand.
docs/recipes.md explains the sections (how defaults were chosen, what is read and refused, reruns). Fields marked
*path* are resolved against the recipe's folder and staged by `submit`; *model* fields are a Hugging Face id or a
model folder.
"""


def reference() -> str:
    lines = [HEADER]
    lines += _section("Top level", Recipe, "", top=True)
    for stage in STAGES:
        lines += [f"## `{stage.name}`", "", stage.help, ""] + _fields(stage.config, f"{stage.name}.")
    serve = Recipe.model_fields["serve"].annotation
    lines += _section("`serve`", typing.get_args(serve)[0], "serve.")
    lines += _section("`kubernetes`", Recipe.model_fields["kubernetes"].annotation, "kubernetes.")
    return "\n".join(lines).rstrip() + "\n"


def _section(title: str, model: type[BaseModel], prefix: str, top: bool = False) -> list[str]:
    doc = (model.__doc__ or "").strip() if model.__doc__ != BaseModel.__doc__ else ""
    return [f"## {title}", ""] + ([doc, ""] if doc and not top else []) + _fields(model, prefix, top)


def _fields(model: type[BaseModel], prefix: str, top: bool = False) -> list[str]:
    """The table of ``model``'s own fields, then a sub-table for each nested section."""
    stage_names = {s.name for s in STAGES}
    rows, nested = ["| field | type | default | meaning |", "|---|---|---|---|"], []
    for name, info in model.model_fields.items():
        if top and name in stage_names | {"serve", "kubernetes"}:
            continue
        section = _nested_model(info.annotation)
        if section is not None:
            nested.append((f"{prefix}{name}", section))
            continue
        rows.append(f"| `{name}` | {_type(info)} | {_default(info)} | {_cell(info.description or '')} |")
    lines = rows + [""]
    for dotted, section in nested:
        doc = (section.__doc__ or "").strip()
        lines += [f"### `{dotted}`", ""] + ([doc, ""] if doc else []) + _fields(section, f"{dotted}.")
    return lines


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type(info) -> str:
    roles = [m for m in info.metadata if isinstance(m, PathRole)] + _roles_inside(info.annotation)
    text = _type_name(info.annotation)
    if roles:
        text += f" ({roles[0].kind if roles[0].kind == 'model' else 'path'})"
    return _cell(text)


def _roles_inside(annotation: Any) -> list[PathRole]:
    found = []
    for arg in typing.get_args(annotation):
        found += [m for m in getattr(arg, "__metadata__", ()) if isinstance(m, PathRole)] + _roles_inside(arg)
    return found


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(info) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    print(reference(), end="")

"""The recipe's building blocks: the strict base model, and the marker types of fields that name files or models.

A field whose value is a path (``InputPaths``, ``InputPath``) or a model (``ModelRef``) says so in its type, and
everything that must find such fields walks the schema for the marker (``path_fields``): resolution against the
recipe's folder, stage fingerprints, ``submit`` staging and ``k8s render``. A new field is found the day it is
declared with one of these types; ``tests/test_recipe_paths.py`` fails when a field that looks like a path is not.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterator, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class PathRole:
    """What a marked field names. ``input``: files, folders or globs (local paths are relative to the recipe's
    folder); ``model``: a Hugging Face id or a model folder (a folder when it exists there or starts with ./, ../ or
    ~). ``prefix``: the value names a path only after this prefix (``hf:MODEL``). ``suffixes``: the formats an input
    folder's files are read in, where they are not the corpus formats (task YAMLs)."""
    kind: Literal["input", "model"]
    prefix: str = ""
    suffixes: tuple[str, ...] = ()


INPUT, MODEL = PathRole("input"), PathRole("model")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# A list of files, directories or globs (local or URIs): a corpus, prompts, samples, references.
InputPaths = Annotated[list[str], BeforeValidator(_as_list), Field(min_length=1), INPUT]
# A list of YAML files, folders of them or globs: evaluation task definitions.
YamlPaths = Annotated[list[str], BeforeValidator(_as_list), Field(min_length=1), PathRole("input", suffixes=(".yaml",
                                                                                                           ".yml"))]
# One file or folder: a classifier, a template, a soft prompt, an index folder.
InputPath = Annotated[str, INPUT]
# A Hugging Face id or a model folder.
ModelRef = Annotated[str, MODEL]
# The field of an input row that holds its id (every stage that reads rows has one).
IdField = Annotated[str, Field(description="Field holding a row id (rows without one get FILE:LINE; a repeated id "
                                           "becomes ID#k).")]


@dataclass(frozen=True)
class PathField:
    """One marked field of the schema: ``dotted`` is its place (``synthesize.craft.documents``; ``*`` stands for
    every key of a mapping, as in ``serve.soft_prompts.*``)."""
    dotted: str
    role: PathRole

    @property
    def section(self) -> str:
        return self.dotted.split(".")[0]


def path_fields(model: type[BaseModel], prefix: str = "") -> Iterator[PathField]:
    """Every marked field of ``model`` and of the models nested in it, depth first in declaration order."""
    for name, info in model.model_fields.items():
        yield from _walk(info.annotation, list(info.metadata), f"{prefix}{name}")


def _walk(annotation: Any, metadata: list, dotted: str) -> Iterator[PathField]:
    role = next((m for m in metadata if isinstance(m, PathRole)), None)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        yield from _walk(args[0], metadata + list(annotation.__metadata__), dotted)
    elif origin in (Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                yield from _walk(arg, metadata, dotted)
    elif origin is dict:
        yield from _walk(args[1], [], f"{dotted}.*")
    elif origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        yield from path_fields(args[0], f"{dotted}.[].")  # each item of a list of sections (pretrain's stages)
    elif role is not None:  # str, or a list of str
        yield PathField(dotted, role)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from path_fields(annotation, f"{dotted}.")


def map_paths(raw: dict, schema: type[BaseModel], fn: Callable[[str, PathRole, str], str]) -> dict:
    """``fn(place, role, path)`` on every path a raw recipe mapping holds in a marked field (one string or a list),
    in place; ``place`` is the field's dotted name with mapping keys filled in. A value without its role's prefix
    (``heuristic`` for ``hf:MODEL``) is left alone."""
    for field in path_fields(schema):
        for holder, key, place in _places(raw, field.dotted.split(".")):
            value = holder[key]
            if isinstance(value, str):
                holder[key] = _apply(fn, place, field.role, value)
            elif isinstance(value, list):
                holder[key] = [_apply(fn, place, field.role, v) if isinstance(v, str) else v for v in value]
    return raw


def _apply(fn: Callable[[str, PathRole, str], str], place: str, role: PathRole, value: str) -> str:
    if not value.startswith(role.prefix) or len(value) == len(role.prefix):
        return value
    return role.prefix + fn(place, role, value[len(role.prefix):])


def _places(node: Any, parts: list[str], trail: str = "") -> Iterator[tuple[dict, str, str]]:
    """(mapping, key, dotted place) for each set value ``parts`` reaches in ``node`` (``*``: every key; ``[]``:
    every item of a list, placed as ``field[i]``)."""
    head, rest = parts[0], parts[1:]
    if head == "[]":
        for i, item in enumerate(node if isinstance(node, list) else []):
            yield from _places(item, rest, f"{trail}[{i}]")
        return
    if not isinstance(node, dict):
        return
    keys = list(node) if head == "*" else [head] if head in node else []
    for key in keys:
        place = f"{trail}.{key}" if trail else str(key)
        if rest:
            yield from _places(node[key], rest, place)
        elif node[key] is not None:
            yield node, key, place


def section_paths(raw: dict, schema: type[BaseModel], section: str) -> list[tuple[str, PathRole, Any]]:
    """(place, role, value) of each marked field set under ``section`` of a raw recipe mapping, in schema order;
    the value is a string or a list of them, as set (prefix kept)."""
    return [(place, field.role, holder[key]) for field in path_fields(schema) if field.section == section
            for holder, key, place in _places(raw, field.dotted.split("."))]

"""Prompt templates: Jinja2 files that users can replace (``synthesize.template``, ``judge.template``).

The defaults live in ``pipelines/synthesis/templates/``. A template is checked before any generation: it must parse, use only
the variables its stage provides and use the ones the prompt cannot do without; it is then rendered once on a real
row, so that a mistake inside it (``{{ examples[0].tittle }}``) fails the run before the engines start. Templates
render in Jinja's sandbox (a recipe's template cannot reach Python) with undefined names as errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


class TemplateError(ValueError):
    """A prompt template cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class PromptTemplate:
    """A template's source (it travels to Ray workers as text and is compiled there) and where it came from."""
    source: str
    origin: str

    def render(self, **variables) -> str:
        return _compile(self.source, self.origin).render(**variables)


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)


_compiled: dict[tuple[str, str], object] = {}


def _compile(source: str, origin: str):
    key = (origin, source)
    if key not in _compiled:
        _compiled[key] = _environment().from_string(source)
    return _compiled[key]


def load_template(path: str | None, default: str, field: str, provided: set[str], required: set[str]) -> PromptTemplate:
    """The template at ``path`` (or the default ``templates/<default>.jinja``), checked against the variables the
    stage ``provided`` and those ``required``; errors name ``field`` and the file."""
    from jinja2 import TemplateSyntaxError, meta

    origin = path or os.path.join(TEMPLATES_DIR, f"{default}.jinja")
    try:
        with open(os.path.expanduser(origin), encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise TemplateError(f"{field}: cannot read template {origin}: {e.strerror or e}") from None
    try:
        used = meta.find_undeclared_variables(_environment().parse(source))
    except TemplateSyntaxError as e:
        raise TemplateError(f"{field}: {origin}, line {e.lineno}: not a valid Jinja2 template: {e.message}") from None
    unknown = sorted(used - provided)
    if unknown:
        raise TemplateError(f"{field}: {origin} uses {', '.join(unknown)}, which this stage does not provide "
                            f"(available: {', '.join(sorted(provided))})")
    missing = sorted(required - used)
    if missing:
        raise TemplateError(f"{field}: {origin} never uses {', '.join(missing)}; the prompt would not contain "
                            f"{'it' if len(missing) == 1 else 'them'}")
    return PromptTemplate(source, origin)


def check_renders(template: PromptTemplate, field: str, **variables) -> str:
    """Render once on real values; a template that fails on them fails here, before any generation."""
    from jinja2 import TemplateError as JinjaError

    try:
        return template.render(**variables)
    except (JinjaError, TypeError, ValueError, AttributeError) as e:
        raise TemplateError(f"{field}: {template.origin} does not render: {type(e).__name__}: {e}") from None


def copied_placeholder(sample: dict, answer_form: str) -> str | None:
    """The first string of ``sample`` holding one of ``answer_form``'s placeholders (``<question>``), if any: a
    model that copied the form it was shown, not a sample. Nested lists of strings are looked into."""
    import re

    placeholders = [p.lower() for p in re.findall(r"<[^<>]+>", answer_form)]
    for value in sample.values():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and any(p in text.lower() for p in placeholders):
                return text
    return None

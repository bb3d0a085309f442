"""jinja2 templates (templates/ beside the package) -> text: the port's header, load_weights and
registration code, and the plugin package's files."""

from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined)


def render(name: str, **kw) -> str:
    return _ENV.get_template(name).render(**kw)

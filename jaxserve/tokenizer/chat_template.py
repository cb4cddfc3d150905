"""Chat templates rendered exactly as transformers renders them: jinja2's
`ImmutableSandboxedEnvironment` with HF's globals, filters and `{% generation %}` tag, and the
message validation that runs before any template sees the input."""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from jaxserve.errors import ChatTemplateError

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's filter: plain json.dumps, no HTML escaping (jinja's own tojson escapes <, >, &, ').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not parse: {e}") from e


def _content_text(content, where: str) -> str:
    """Message content as one string: a string, or a list of OpenAI text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ChatTemplateError(
                    f"{where}: content parts must be {{'type': 'text', 'text': str}} "
                    f"(jaxserve serves text-only models), got {part!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatTemplateError(f"{where}: content must be a string or a list of text parts, "
                            f"got {type(content).__name__}")


ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's


def validate_messages(messages) -> list[dict]:
    """Check and copy chat messages: each a mapping with a `role` of OpenAI's (ROLES) and a string
    `content`.

    Content given as a list of text parts is joined into one string; `content` may be missing or
    None only on an assistant message that carries `tool_calls`. Other keys pass through.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} mappings, "
                                f"got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where} must be a mapping with 'role' and 'content', "
                                    f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:  # templates print the role verbatim: any other text could inject
            raise ChatTemplateError(f"{where}['role'] must be one of {', '.join(ROLES)}, "
                                    f"got {role!r}")
        message = dict(message)
        if message.get("content") is None:
            if not message.get("tool_calls"):
                raise ChatTemplateError(f"{where}['content'] must be a string (it may be omitted only "
                                        "on an assistant message with tool_calls)")
        else:
            message["content"] = _content_text(message["content"], where)
        checked.append(message)
    return checked

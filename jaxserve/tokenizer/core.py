"""`Tokenizer`: text <-> token ids with the model's special tokens and chat template, built from an
HF folder or from GGUF metadata."""

from __future__ import annotations

import json
import pathlib
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence

import jinja2
import tokenizers
from tokenizers import AddedToken

from jaxserve.errors import ChatTemplateError, CheckpointError, TokenizerError
from jaxserve.tokenizer.chat_template import _compile_template, validate_messages
from jaxserve.tokenizer.gguf_vocab import (_CONTROL, _END_OF_GENERATION_TEXTS, _NORMAL, _UNKNOWN,
                                           _USER_DEFINED, _byte_level_backend, _meta_list,
                                           _sentencepiece_backend)

class Tokenizer:
    """A text <-> token id codec with the model's special tokens and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], add_bos_token: bool = False,
                 chat_template: str | Mapping[str, str] | None = None,
                 template_tokens: Mapping[str, str] | None = None):
        self._backend = backend  # parses special-token text into control tokens
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())  # treats it as text
        self._plain.encode_special_tokens = True
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        # Variables HF passes to every template: bos_token, eos_token, pad_token, unk_token.
        self._template_tokens = dict(template_tokens or {})
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.all_special_ids = tuple(sorted(i for i, t in added.items() if t.special))
        self._special = {added[i].content: (i, added[i]) for i in self.all_special_ids}
        longest_first = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, object]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes from its decoded key/value metadata."""
        model = meta.get("tokenizer.ggml.model")
        tokens = _meta_list(meta, "tokenizer.ggml.tokens")
        types = _meta_list(meta, "tokenizer.ggml.token_type", required=False) or [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"GGUF metadata has {len(tokens)} tokens but {len(types)} token types")

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not isinstance(value, int) or not 0 <= value < len(tokens):
                raise TokenizerError(f"GGUF tokenizer.ggml.{key} = {value!r} is not a token id "
                                     f"in [0, {len(tokens)})")
            return value

        if model == "gpt2":
            backend = _byte_level_backend(tokens, types, _meta_list(meta, "tokenizer.ggml.merges"),
                                          str(meta.get("tokenizer.ggml.pre", "default")))
            add_bos_default = False
        elif model == "llama":
            scores = _meta_list(meta, "tokenizer.ggml.scores")
            if len(scores) != len(tokens):
                raise TokenizerError(f"GGUF metadata has {len(tokens)} tokens but {len(scores)} scores")
            backend = _sentencepiece_backend(tokens, types, scores, token_id("unknown_token_id"),
                                             bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r}; jaxserve builds 'gpt2' "
                                 "(byte-level BPE) and 'llama' (SentencePiece BPE) tokenizers")
        # Control tokens are special (matched whole, skipped on decode); user-defined ones are
        # matched whole but are ordinary text on decode.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types) if k == _USER_DEFINED])

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        eos_ids = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
        eos_ids += [i for i, (t, k) in enumerate(zip(tokens, types))
                    if k == _CONTROL and t in _END_OF_GENERATION_TEXTS]
        names = {"bos_token": bos, "eos_token": eos, "unk_token": token_id("unknown_token_id"),
                 "pad_token": token_id("padding_token_id")}
        template = meta.get("tokenizer.chat_template")
        named = {str(name): meta[f"tokenizer.chat_template.{name}"]
                 for name in meta.get("tokenizer.chat_templates") or ()
                 if f"tokenizer.chat_template.{name}" in meta}
        if named:
            template = {**({"default": template} if template else {}), **named}
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids,
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   chat_template=template,
                   template_tokens={k: tokens[i] for k, i in names.items() if i is not None})

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        """Load an HF tokenizer folder: tokenizer.json, tokenizer_config.json, chat_template.jinja,
        and eos ids from generation_config.json / config.json when present."""
        path = pathlib.Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(path / "tokenizer.json", "missing: jaxserve loads HF tokenizers from "
                                  "tokenizer.json (the 'fast' tokenizer format)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(path / "tokenizer.json", f"not a valid tokenizers file: {e}") from e

        def read_json(name: str) -> dict:
            file = path / name
            if not file.is_file():
                return {}
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise CheckpointError(file, f"unreadable JSON: {e}") from e
            if not isinstance(data, dict):
                raise CheckpointError(file, "must hold a JSON object")
            return data

        config = read_json("tokenizer_config.json")
        names = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
        bos = backend.token_to_id(names["bos_token"]) if "bos_token" in names else None
        eos_ids = [backend.token_to_id(names["eos_token"])] if "eos_token" in names else []
        for name in ("generation_config.json", "config.json"):
            value = read_json(name).get("eos_token_id")
            eos_ids += value if isinstance(value, list) else [value]
        eos_ids = [i for i in eos_ids if isinstance(i, int)]

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif read_json("chat_template.json").get("chat_template"):
            template = read_json("chat_template.json")["chat_template"]

        add_bos = config.get("add_bos_token")
        if add_bos is None and bos is not None:  # infer it from the post-processor
            add_bos = backend.encode("a", add_special_tokens=True).ids[:1] == [bos]
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, add_bos_token=bool(add_bos),
                   chat_template=template, template_tokens=names)

    # -- encoding and decoding ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, *, add_special_tokens: bool = False,
               parse_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text (e.g. "<|im_end|>") is encoded as plain text
        unless `parse_special`; `add_special_tokens` prepends BOS when the model asks for it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        backend = self._backend if parse_special else self._plain
        ids = backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------------

    def _template_source(self, tools) -> str:
        template = self.chat_template
        if isinstance(template, Mapping):
            name = "tool_use" if tools and "tool_use" in template else "default"
            template = template.get(name)
        if not template:
            raise ChatTemplateError("this model has no chat template, so it cannot take chat messages; "
                                    "send a plain prompt (completions) instead")
        return template

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools, kwargs) -> str:
        if tools is not None and not (isinstance(tools, Sequence)
                                      and all(isinstance(t, Mapping) for t in tools)):
            raise ChatTemplateError("tools must be a list of JSON-schema mappings")
        template = _compile_template(self._template_source(tools))
        variables = {**self._template_tokens, "documents": None, **kwargs}
        try:
            return template.render(messages=messages, tools=tools,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # includes raise_exception() from the template
            raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from e

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True, tools=None,
                            **kwargs) -> str:
        """The prompt text the model's chat template renders for `messages` (HF-compatible)."""
        return self._render(validate_messages(messages), add_generation_prompt, tools, kwargs)

    def encode_chat(self, messages, *, add_generation_prompt: bool = True, tools=None,
                    **kwargs) -> list[int]:
        """Token ids of the rendered chat. Control tokens written by the template become control
        tokens; special-token text inside message contents stays plain text.

        Contents are rendered with their special-token text swapped for random placeholders; the
        rendered text is then split at the (template's) special tokens, and the pieces between are
        encoded as plain text with the placeholders put back.
        """
        messages = validate_messages(messages)
        nonce = secrets.token_hex(8)
        marked: dict[str, str] = {}

        def mark(match: re.Match) -> str:
            placeholder = f"\ue000{nonce}{len(marked)}\ue001"
            marked[placeholder] = match.group(0)
            return placeholder

        def mark_all(value):  # every string a template may print: contents, names, tool calls
            if isinstance(value, str):
                return self._special_re.sub(mark, value)
            if isinstance(value, Mapping):
                return {k: mark_all(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [mark_all(v) for v in value]
            return value

        messages = [{k: v if k == "role" else mark_all(v) for k, v in m.items()} for m in messages]
        rendered = self._render(messages, add_generation_prompt, tools, kwargs)
        unmark = re.compile(f"\ue000{nonce}\\d+\ue001")

        ids: list[int] = []
        pieces = self._special_re.split(rendered) if self._special else [rendered]
        specials = self._special_re.findall(rendered) if self._special else []
        for i, piece in enumerate(pieces):
            # AddedToken lstrip/rstrip: the token swallows the whitespace on that side.
            if i > 0 and self._special[specials[i - 1]][1].rstrip:
                piece = piece.lstrip()
            if i < len(specials) and self._special[specials[i]][1].lstrip:
                piece = piece.rstrip()
            if piece:
                text = unmark.sub(lambda m: marked.get(m.group(0), m.group(0)), piece)
                ids += self._plain.encode(text, add_special_tokens=False).ids
            if i < len(specials):
                ids.append(self._special[specials[i]][0])
        return ids

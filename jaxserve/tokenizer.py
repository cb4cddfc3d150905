"""Tokenizers, chat templates and incremental detokenization.

How the pieces fit:

- `Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust one). It is built from an HF
  folder (`Tokenizer.from_dir`: tokenizer.json + tokenizer_config.json) or rebuilt from GGUF metadata
  (`Tokenizer.from_gguf_metadata`: llama.cpp's `tokenizer.ggml.*` keys become an equivalent byte-level
  or SentencePiece-style BPE). It keeps two copies of the backend: one that parses special-token text
  into control tokens and one that treats it as plain text (`encode_special_tokens`), so that text
  from users never turns into control tokens unless asked for (`parse_special=True`).
- Chat templates are rendered as Hugging Face does (jinja2 `ImmutableSandboxedEnvironment`, the same
  globals and `tojson` filter), so prompts equal `transformers`' `apply_chat_template`. `encode_chat`
  differs on purpose: special-token text inside a message's content stays plain text; only the
  control tokens the template itself writes become control tokens.
- `IncrementalDetokenizer` turns one request's stream of token ids into text deltas, holding back
  incomplete UTF-8 characters and text that may be the start of a stop string. Each step decodes a
  window of a few recent tokens (vLLM's prefix/read offsets), so it costs O(new tokens).
"""

from __future__ import annotations

import datetime
import functools
import json
import pathlib
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from jaxserve.errors import CheckpointError, JaxserveError


class TokenizerError(JaxserveError, ValueError):
    """Tokenizer metadata (GGUF keys, tokenizer files) that jaxserve cannot turn into a tokenizer."""


class ChatTemplateError(JaxserveError, ValueError):
    """Bad chat messages, a model without a chat template, or a template that refused the input."""


# ---------------------------------------------------------------------------------------------------
# GGUF metadata -> tokenizers.Tokenizer
# ---------------------------------------------------------------------------------------------------

# llama.cpp token types (gguf `tokenizer.ggml.token_type`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp lists them.
# Each regex isolates its matches; they are applied one after another.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# StarCoder-family vocabularies (SmolLM among them) were trained with every digit split off first.
# (transformers' GGUF loader drops this step, so it differs from the original tokenizer.json on
# whitespace runs before digits, e.g. "x  1"; we follow the original and llama.cpp.)
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2_SPLIT)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,), "gpt2": (_GPT2_SPLIT,),
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2, "command-r": _DIGITS_THEN_GPT2,
    "llama-bpe": (_LLAMA3_SPLIT,), "llama3": (_LLAMA3_SPLIT,), "llama-v3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,), "dbrx": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,), "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}
# llama.cpp also stops on these control tokens when a GGUF names them (end-of-generation tokens).
_END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                            "<|eom_id|>", "<EOT>", "<｜end▁of▁sentence｜>")


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every byte as one char).

    Printable latin-1 bytes map to themselves; the other 68 bytes map to 256, 257, ... in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _meta_list(meta: Mapping, key: str, *, required: bool = True) -> list | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise TokenizerError(f"GGUF metadata has no {key!r}; it is needed to build the tokenizer")
        return None
    if not isinstance(value, (list, tuple)):
        raise TokenizerError(f"GGUF metadata {key!r} must be an array, got {type(value).__name__}")
    return list(value)


def _byte_level_backend(tokens: list[str], types: list[int], merges: list[str],
                        pre: str) -> tokenizers.Tokenizer:
    if pre not in PRE_TOKENIZER_SPLITS:
        raise TokenizerError(
            f"unsupported tokenizer.ggml.pre {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    alphabet = set(_byte_alphabet())
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_NORMAL, _BYTE, _UNUSED) and not set(token) <= alphabet:
            token = "".join(_byte_alphabet()[b] for b in token.encode("utf-8"))  # stored unspelled
        vocab[token] = i
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"GGUF merge {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # the Rust builder's error, e.g. a merge of a token not in the vocabulary
        raise TokenizerError(f"GGUF vocabulary and merges do not form a BPE model: {e}") from e
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(tokens: list[str], types: list[int], scores: list[float],
                           unk_id: int | None, add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama-2 style) as a `tokenizers` BPE with byte fallback.

    SentencePiece BPE repeatedly merges the adjacent pair whose merged piece scores highest, so the
    merge list is every (left, right) split of a piece into two vocabulary pieces, ranked by the
    merged piece's score (then by id). Spaces become "▁"; like llama.cpp, a "▁" is prepended to every
    stretch of text (also after a control token) when `add_space_prefix`.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, types) if kind in (_NORMAL, _USER_DEFINED)}
    candidates = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                candidates.append((-scores[vocab[piece]], vocab[piece], vocab[left], vocab[right]))
    candidates.sort()
    pairs = [(tokens[left], tokens[right]) for _, _, left, right in candidates]
    unk = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True,
                                              byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend


# ---------------------------------------------------------------------------------------------------
# Chat templates (rendered exactly as transformers renders them)
# ---------------------------------------------------------------------------------------------------

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


def validate_messages(messages) -> list[dict]:
    """Check and copy chat messages: each a mapping with a string `role` and string `content`.

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
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"{where}['role'] must be a non-empty string, got {role!r}")
        message = dict(message)
        if message.get("content") is None:
            if not message.get("tool_calls"):
                raise ChatTemplateError(f"{where}['content'] must be a string (it may be omitted only "
                                        "on an assistant message with tool_calls)")
        else:
            message["content"] = _content_text(message["content"], where)
        checked.append(message)
    return checked


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

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

        for message in messages:
            for key in ("content", "reasoning_content"):
                if isinstance(message.get(key), str):
                    message[key] = self._special_re.sub(mark, message[key])
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


# ---------------------------------------------------------------------------------------------------
# Incremental detokenization
# ---------------------------------------------------------------------------------------------------

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, so its first space survives
_MAX_HELD_TOKENS = 3  # an unfinished UTF-8 character has at most 3 of its 4 bytes


class IncrementalDetokenizer:
    """Per-request streaming decoder with stop strings.

    `add(new_token_ids)` returns the text delta; the deltas concatenated (after `flush()`) equal
    `tokenizer.decode(output_ids)` up to a stop string. Offsets as in vLLM: `_window` holds the tokens
    from the prefix offset on, `_read` is where the not-yet-confirmed tokens start. A step decodes the
    window and confirms the text past the prefix, except trailing tokens of an incomplete character.
    Confirmed text that may begin a stop string is held in `_pending` until disambiguated.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: str | Sequence[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0):
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._skipped = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens  # as vLLM: no stop-string check until more tokens than this
        self._num_tokens = 0
        context = [int(i) for i in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        if self._decode(context).endswith("\ufffd"):
            context = []  # the prompt ends inside a character: decode the output on its own
        self._window = context
        self._read = len(context)
        self._prefix_text: str | None = None  # decode(_window[:_read]), cached while holding
        self._pending = ""  # confirmed text held back from the deltas (a possible stop-string start)
        self._emitted: list[str] = []
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text so far (truncated at a stop string), including held-back text."""
        if len(self._emitted) > 1:
            self._emitted[:] = ["".join(self._emitted)]
        return (self._emitted[0] if self._emitted else "") + self._pending

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, new_token_ids: Iterable[int]) -> str:
        """Append the request's newly sampled tokens; return the text they complete."""
        if self.stopped:
            return ""
        start = len(self._window)
        self._window.extend(int(i) for i in new_token_ids)
        self._num_tokens += len(self._window) - start
        return self._advance(final=False)

    def flush(self) -> str:
        """Release everything held back (call once the request finished for another reason)."""
        if self.stopped:
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[:self._read])
        new_text = self._decode(self._window)
        cut = len(self._window)
        if new_text.endswith("\ufffd") and not final:
            # Hold back the last few tokens if they hold an incomplete character: cut where the
            # text decodes the same in two parts, i.e. where the UTF-8 decoder is between characters.
            # (A character has at most 4 bytes, so at most 3 tokens of an unfinished one are here,
            # not counting skipped special tokens between them; if no such cut exists the bytes
            # are invalid, not unfinished, and are emitted as is.)
            held = 0
            for j in range(1, cut - self._read + 1):
                held += self._window[-j] not in self._skipped
                if held > _MAX_HELD_TOKENS:
                    break
                head, tail = self._decode(self._window[:-j]), self._decode(self._window[-j:])
                if tail.endswith("\ufffd") and head + tail == new_text:
                    cut, new_text = cut - j, head
                    break
        if cut > self._read:
            self._pending += new_text[len(self._prefix_text):]
            del self._window[:self._read]
            self._read = cut - self._read
            self._prefix_text = None
        return self._release(final)

    def _release(self, final: bool) -> str:
        # Earliest stop string in the pending text (it cannot hold one that started before it).
        best = None
        for s in self._stop if self._num_tokens > self._min_tokens else ():
            at = self._pending.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            delta = self._pending[:at + len(s) if self._include_stop else at]
            self._pending = ""
            self.stopped, self.stop_reason = True, s
        else:
            hold = 0 if final else self._stop_prefix_length(self._pending)
            delta, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        if delta:
            self._emitted.append(delta)
        return delta

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

"""Tokenizers, chat templates and incremental detokenization.

How the pieces fit:

- `Tokenizer` (core.py) wraps a Hugging Face `tokenizers.Tokenizer` (the Rust one). It is built
  from an HF folder (`Tokenizer.from_dir`: tokenizer.json + tokenizer_config.json) or rebuilt from
  GGUF metadata (`Tokenizer.from_gguf_metadata`; gguf_vocab.py turns llama.cpp's
  `tokenizer.ggml.*` keys into an equivalent byte-level or SentencePiece-style BPE). It keeps two
  copies of the backend: one that parses special-token text into control tokens and one that
  treats it as plain text (`encode_special_tokens`), so that text from users never turns into
  control tokens unless asked for (`parse_special=True`).
- Chat templates (chat_template.py) are rendered as Hugging Face does (jinja2
  `ImmutableSandboxedEnvironment`, the same globals and `tojson` filter), so prompts equal
  `transformers`' `apply_chat_template`. `encode_chat` differs on purpose: special-token text
  inside a message's content stays plain text; only the control tokens the template itself
  writes become control tokens.
- `IncrementalDetokenizer` (detokenizer.py) turns one request's stream of token ids into text
  deltas, holding back incomplete UTF-8 characters and text that may be the start of a stop
  string. Each step decodes a window of a few recent tokens (vLLM's prefix/read offsets), so it
  costs O(new tokens).
"""

from jaxserve.errors import ChatTemplateError, TokenizerError
from jaxserve.tokenizer.chat_template import validate_messages
from jaxserve.tokenizer.core import Tokenizer
from jaxserve.tokenizer.detokenizer import IncrementalDetokenizer
from jaxserve.tokenizer.gguf_vocab import PRE_TOKENIZER_SPLITS

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "PRE_TOKENIZER_SPLITS", "Tokenizer",
           "TokenizerError", "validate_messages"]

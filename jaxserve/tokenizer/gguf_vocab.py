"""GGUF tokenizer metadata (llama.cpp's `tokenizer.ggml.*` keys) -> an equivalent Hugging Face
`tokenizers.Tokenizer`: byte-level BPE (gpt2-style vocabularies) or SentencePiece-style BPE
(llama-style vocabularies with byte-fallback tokens)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from jaxserve.errors import TokenizerError

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

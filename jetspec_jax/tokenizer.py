"""Text <-> token ids, and chat templates, for the models we load.

    tok = Tokenizer.from_dir("path/to/hf_model")              # tokenizer.json (+ tokenizer_config.json)
    tok = Tokenizer.from_gguf_metadata(metadata)                # the `tokenizer.*` keys of a GGUF
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = tok.decode(new_ids)

A GGUF carries no tokenizer.json: we rebuild a byte-level BPE `tokenizers.Tokenizer` from its
vocabulary, merges and token types, splitting text with the regexes llama.cpp uses for the file's
`tokenizer.ggml.pre` (see `PRE_TOKENIZER_SPLITS`). Chat templates are rendered as transformers
renders them: a sandboxed jinja2 environment with `raise_exception`, trim_blocks and lstrip_blocks.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from jetspec_jax.errors import UserError

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> (regexes applied in turn, each splitting the previous pieces; whether
# whole words found in the vocabulary skip the merges). Taken from llama.cpp's llama-vocab.cpp.
PRE_TOKENIZER_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((_GPT2_SPLIT,), False),
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),  # every digit alone, then GPT-2
    "starcoder": ((r"\p{N}", _GPT2_SPLIT), False),
    "refact": ((r"\p{N}", _GPT2_SPLIT), False),
    "qwen2": ((_QWEN2_SPLIT,), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "llama3": ((_LLAMA3_SPLIT,), True),
}
# Token types in `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# Tokens that end a turn or a document in the chat formats we know; see `Tokenizer.eos_ids`.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    """The chat template environment transformers uses (so both render identical strings)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"bad chat template: {e}") from None


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and the special tokens that end a reply."""

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 extra_eos_ids: Iterable[int] = (), template_vars: Mapping[str, str] | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile_template(chat_template) if chat_template else None
        self._template_vars = {k: v for k, v in (template_vars or {}).items() if v is not None}
        self._template_vars.update(bos_token=bos_token or "", eos_token=eos_token or "")
        self.eos_ids = self._end_ids(extra_eos_ids)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """From an HF directory: tokenizer.json, and where present tokenizer_config.json,
        chat_template.jinja, generation_config.json and config.json (for eos ids)."""
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on a missing or bad file
            raise UserError(f"cannot load {path / 'tokenizer.json'}: {e}") from None
        config = _read_optional_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eos_ids = []
        for file in ("generation_config.json", "config.json"):
            value = _read_optional_json(path / file).get("eos_token_id")
            eos_ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
        return cls(backend, chat_template=template, bos_token=_token_content(config.get("bos_token")),
                   eos_token=_token_content(config.get("eos_token")), extra_eos_ids=eos_ids,
                   template_vars={k: _token_content(config.get(k)) for k in ("unk_token", "pad_token")})

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """From a GGUF's `tokenizer.ggml.*` / `tokenizer.chat_template` metadata (byte-level BPE)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UserError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE, 'gpt2')")
        pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in PRE_TOKENIZER_SPLITS:
            raise UserError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(PRE_TOKENIZER_SPLITS)}")
        splits, ignore_merges = PRE_TOKENIZER_SPLITS[pre]
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", ())]
        vocab = {token: i for i, token in enumerate(tokens)}

        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # llama.cpp matches control and user-defined tokens whole wherever they occur in the text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types) if k == _USER_DEFINED])

        def token(key):
            i = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = token("bos"), token("eos")
        if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
        return cls(backend, chat_template=metadata.get("tokenizer.chat_template"), bos_token=bos,
                   eos_token=eos, template_vars={"unk_token": token("unknown"), "pad_token": token("padding")})

    def _end_ids(self, extra: Iterable[int]) -> tuple[int, ...]:
        """eos, extra ids from the config, and the known end-of-turn tokens of this vocabulary
        that the chat template writes (or <|endoftext|>, a document end wherever it exists)."""
        ids = [self.backend.token_to_id(self.eos_token)] if self.eos_token else []
        ids += list(extra)
        for token in _END_OF_TURN_TOKENS:
            if token in (self.chat_template or "") or token == "<|endoftext|>":
                ids.append(self.backend.token_to_id(token))
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    # ----------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special tokens written in `text` (e.g. "<|im_end|>") always become their single id;
        `add_special_tokens` adds what the model adds around a sequence (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}, ...])."""
        if self._template is None:
            raise UserError("this model has no chat template; pass raw prompt ids instead")
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
            raise UserError('messages must be a list of {"role": str, "content": str} objects')
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self._template_vars)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"chat template rejected the messages: {e}") from None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template writes any BOS itself)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _read_optional_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text())
    except ValueError as e:
        raise UserError(f"cannot parse {file}: {e}") from None
    return value if isinstance(value, dict) else {}


class StreamDecoder:
    """Turns ids arriving a few at a time into text, never splitting a multi-byte character.

        stream = StreamDecoder(tok)
        for ids in rounds: print(stream.push(ids), end="")
        print(stream.flush())

    Decodes a short window: the text of ids[prefix:read] (already emitted) against the text of
    ids[prefix:]; new text is emitted once it no longer ends in U+FFFD (an incomplete UTF-8
    sequence). Keeping the window's first token makes decoders that strip a leading space
    (sentencepiece) give the same prefix text both times. Concatenated outputs equal
    `decode(all ids)` whenever that decode has no stray U+FFFD of its own.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this have been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: int | Iterable[int]) -> str:
        """Add ids; return the text they complete ("" while a character is still incomplete)."""
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character, as U+FFFD)."""
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]

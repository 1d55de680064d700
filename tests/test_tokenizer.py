"""Tokenizers rebuilt from GGUF metadata: same ids as transformers and as llama.cpp's own vectors."""

from __future__ import annotations

import pytest

from jetspec_jax.errors import UserError
from jetspec_jax.loading.gguf import read_gguf
from jetspec_jax.loading.registry import cache_dir, fetch_sdist_members
from jetspec_jax.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world", " Hello  world!\n\n", "3.14159 + 2718 = 12345678", "x = [1, 22, 333] # 2024-06-01",
    "naïve café — “quotes” ’tis", "日本語のテキストと中文，标点。", "emoji 🦙🔥👩‍👩‍👧 done", "ÄÖÜ äöü ß Ελληνικά русский",
    "def f(x):\n\treturn x**2  # comment\n\n\nclass A:\n    pass\n", "   leading and trailing   ",
    "\n\n\n", "tabs\t\tand\r\nCRLF\r\n", "", " ", "I'm can't we'll they've THEY'RE",
    "$$\\frac{1}{2}$$ and `code` <b>html</b>", "Ｆｕｌｌ width １２３", "a" * 300,
    "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b <|im_end|>", "<repo_name>x<file_sep>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
     {"role": "user", "content": "Translate 'cat' to 日本語."}],
]
# Templates exercising what real ones use: whitespace control (trim_blocks / lstrip_blocks),
# loop variables, tojson, raise_exception, bos/eos variables.
TEMPLATES = [
    """{{ bos_token }}{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
    {% if loop.first and m['role'] != 'system' %}<|im_start|>system
Default<|im_end|>
{% endif %}
<|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% if loop.last and m['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}""",
    "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}>>{% endif %}",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(our tokenizer, transformers' tokenizer) for the SmolLM2 GGUF."""
    import transformers

    ours = Tokenizer.from_gguf_metadata(read_gguf(smollm2_gguf).metadata)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return ours, ref


def ref_chat_ids(ref, conversation, template=None):
    return ref.apply_chat_template(conversation, chat_template=template, add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


# ----------------------------------------------------------------------------- SmolLM2 vs transformers


@pytest.mark.real_model
def test_smollm2_ids_match_transformers(smollm2):
    ours, ref = smollm2
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True), text
    assert ours.encode("<|im_end|>") == [2]  # special tokens written in the text stay whole


@pytest.mark.real_model
def test_smollm2_chat_template_matches_transformers(smollm2):
    ours, ref = smollm2
    for conversation in CONVERSATIONS:
        assert ours.apply_chat_template(conversation) == ref_chat_ids(ref, conversation)
    for template in TEMPLATES:
        tok = Tokenizer(ours.backend, chat_template=template, bos_token=ours.bos_token, eos_token=ours.eos_token)
        for conversation in CONVERSATIONS:
            expected = ref.apply_chat_template(conversation, chat_template=template, add_generation_prompt=True,
                                               tokenize=False)
            assert tok.render_chat(conversation) == expected


@pytest.mark.real_model
def test_smollm2_special_ids_and_decode(smollm2):
    ours, ref = smollm2
    assert ours.eos_ids == (2, 0)  # <|im_end|> (the file's eos, and the template's turn end), <|endoftext|>
    assert ours.bos_id == 1 and ours.vocab_size == 49152
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.real_model
def test_tokenizer_from_hf_dir(smollm2, tmp_path):
    ours, ref = smollm2
    ref.save_pretrained(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
    for conversation in CONVERSATIONS:
        assert loaded.apply_chat_template(conversation) == ours.apply_chat_template(conversation)
    assert 2 in loaded.eos_ids


@pytest.mark.real_model
def test_stream_decoder_never_splits_characters(smollm2):
    ours, _ = smollm2
    text = "Emoji 🦙🔥👩‍👩‍👧, 日本語 and Ελληνικά: done."
    ids = ours.encode(text)
    for step in (1, 2, 3):
        stream = StreamDecoder(ours)
        pieces = [stream.push(ids[i:i + step]) for i in range(0, len(ids), step)] + [stream.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)
    stream = StreamDecoder(ours)
    assert stream.push(ours.encode("🦙")[:1]) == ""  # first byte(s) of a 4-byte character
    assert stream.flush() == "\ufffd"


@pytest.mark.real_model
def test_chat_errors(smollm2):
    ours, _ = smollm2
    strict = Tokenizer(ours.backend, chat_template=TEMPLATES[0])
    with pytest.raises(UserError, match="bad role"):
        strict.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(UserError, match="messages must be"):
        strict.apply_chat_template(["hello"])
    with pytest.raises(UserError, match="no chat template"):
        Tokenizer(ours.backend).apply_chat_template(CONVERSATIONS[0])


# ----------------------------------------------------------------------------- llama.cpp's vectors

LLAMA_CPP_SDIST = ("llama-cpp-python", "0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
# The vocabularies whose pre-tokenizer we implement (smollm shares starcoder's and refact's).
VOCABS = ["gpt-2", "starcoder", "refact", "qwen2", "llama-bpe"]


@pytest.fixture(scope="module")
def llama_cpp_vocabs():
    """{vocab: gguf path} with .inp/.out beside each, extracted once into the cache."""
    members = [f"vendor/llama.cpp/models/ggml-vocab-{v}.gguf{ext}" for v in VOCABS for ext in ("", ".inp", ".out")]
    package, version, sha256 = LLAMA_CPP_SDIST
    paths = fetch_sdist_members(package, version, sha256, members, cache_dir() / f"{package}-{version}")
    return {v: paths[f"vendor/llama.cpp/models/ggml-vocab-{v}.gguf"] for v in VOCABS}


def read_vectors(gguf_path) -> list[tuple[str, list[int]]]:
    """Pairs (text, ids) as llama.cpp's tests/test-tokenizer-0.cpp reads them."""
    raw = open(f"{gguf_path}.inp", encoding="utf-8", newline="").read()
    sep, texts, pos = "\n__ggml_vocab_test__\n", [], 0
    while pos < len(raw):
        end = raw.find(sep, pos)
        if end < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:end])
        pos = end + len(sep)
    lines = open(f"{gguf_path}.out", encoding="utf-8").read().split("\n")
    assert len(lines) >= len(texts)
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines)]


@pytest.mark.parametrize("vocab", VOCABS)
def test_llama_cpp_vectors(llama_cpp_vocabs, vocab):
    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(llama_cpp_vocabs[vocab]).metadata)
    vectors = read_vectors(llama_cpp_vocabs[vocab])
    assert len(vectors) > 40
    for text, ids in vectors:
        assert tokenizer.encode(text) == ids, text


def test_unsupported_pre_tokenizer():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(UserError, match="unsupported GGUF pre-tokenizer 'deepseek-llm'"):
        Tokenizer.from_gguf_metadata(metadata)
    with pytest.raises(UserError, match="only byte-level BPE"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.model": "llama"})

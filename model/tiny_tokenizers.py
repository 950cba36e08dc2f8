"""Tokenizers for the offline tiny-model bundle, built without any network access.

CLIP tokenizers reuse the real CLIP BPE vocabulary that open_clip_torch ships, so token ids
match the real CLIP-L/CLIP-G tokenizers exactly. T5 and the captioner's Llama-style tokenizer
are small sentencepiece models trained on the spot on a seeded English-like corpus (made of
whole words from the CLIP vocabulary), so the same seed always yields the same files.
"""

from __future__ import annotations

import functools
import gzip
import io
import random
from pathlib import Path

import open_clip
import sentencepiece as spm
from transformers import CLIPTokenizer, LlamaTokenizer, T5Tokenizer

CLIP_MAX_LENGTH = 77
IMAGE_TOKEN = "<image>"

# LLaVA-1.5 style prompt ("USER: <image>\n... ASSISTANT:"), using the content-list message
# format that AutoProcessor.apply_chat_template passes in.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest are shifted
    # past 255 so that every byte has a visible, whitespace-free character.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@functools.cache
def clip_bpe_merges() -> tuple[tuple[str, str], ...]:
    """The 48,894 merges of CLIP's BPE, read from the vocabulary file open_clip ships."""
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # Same slice as open_clip's SimpleTokenizer: 49152 - 256 byte tokens - 2 special tokens.
    return tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])


def clip_bpe_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """CLIP's vocabulary (49,408 entries) in the order open_clip and transformers both use."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [char + "</w>" for char in alphabet]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer identical in ids to openai/clip-vit-large-patch14's.

    SD3 pads CLIP-L prompts with "<|endoftext|>" and CLIP-G prompts with "!" (id 0).
    """
    merges = clip_bpe_merges()
    return CLIPTokenizer(
        vocab=clip_bpe_vocab(merges),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def english_corpus(seed: int, num_lines: int = 3000, num_words: int = 3000) -> list[str]:
    """Seeded caption-like lines made of the most frequent whole words of the CLIP vocabulary."""
    words = []
    for left, right in clip_bpe_merges():
        word = left + right.removesuffix("</w>")
        if right.endswith("</w>") and word.isalpha():
            words.append(word)
        if len(words) == num_words:
            break
    rng = random.Random(seed)
    punctuation = ["", "", "", ",", ".", "!", "?", ":"]
    lines = []
    for _ in range(num_lines):
        line = " ".join(
            rng.choice(words) + rng.choice(punctuation) for _ in range(rng.randint(3, 14))
        )
        if rng.random() < 0.3:
            line = f"{rng.randint(0, 2030)} {line.capitalize()}"
        lines.append(line)
    return lines


def train_sentencepiece(corpus: list[str], vocab_size: int, **special_ids: int) -> bytes:
    """Train a sentencepiece model in memory; single-threaded so the result is deterministic."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **special_ids,
    )
    return model.getvalue()


def build_t5_tokenizer(corpus: list[str], out_dir: Path, vocab_size: int = 1000) -> T5Tokenizer:
    """A T5 tokenizer (unigram sentencepiece; ids pad 0, eos 1, unk 2 as in T5 v1.1).

    `spiece.model` is kept next to tokenizer.json, like the real T5 tokenizer folders.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(
        corpus, vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )
    (out_dir / "spiece.model").write_bytes(model)
    return T5Tokenizer.from_pretrained(out_dir, model_max_length=CLIP_MAX_LENGTH)


def build_llama_tokenizer(
    corpus: list[str], out_dir: Path, vocab_size: int = 1000
) -> LlamaTokenizer:
    """A Llama-style tokenizer (BPE with byte fallback) with <image>, <pad> and a chat template.

    Padding is on the left so batched generation appends new tokens right after each prompt.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(
        corpus,
        vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    (out_dir / "tokenizer.model").write_bytes(model)
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, padding_side="left", model_max_length=512)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    (out_dir / "tokenizer.model").unlink()  # tokenizer.json now holds everything
    return tokenizer

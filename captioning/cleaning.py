"""Caption cleaning: strip VLM boilerplate, reject empty or refused outputs, fit the budget.

VLMs open most answers with "The image shows ..." and sometimes refuse or loop; these words
carry no content and would take a large share of CLIP's 77 tokens. A rejected caption keeps
its reason (`empty_caption`, `refusal`, `repetitive_caption`), never a silent blank. Long
captions are cut at the last whole sentence (else word) that fits the text encoders' token
budget, so the encoders never truncate a caption mid-word.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

TokenCounter = Callable[[str], int]

_SUBJECT = r"(?:the|this|these|that|an?)\s+(?:\w+\s+)?(?:image|images|picture|photo|photograph|" \
    r"illustration|painting|drawing|scene|artwork|render|rendering|screenshot|frame|shot)"
_VERB = r"(?:shows|show|depicts|depict|features|displays|presents|captures|portrays|" \
    r"illustrates|contains|is of|is(?=\s+an?\s)|appears to (?:show|be|depict))"
_BOILERPLATE = [
    re.compile(rf"^(?:in\s+)?{_SUBJECT}\s*,?\s+{_VERB}\s*:?\s*", re.IGNORECASE),
    re.compile(rf"^in\s+{_SUBJECT}\s*,?\s*(?:we\s+(?:can\s+)?see\s+|there\s+(?:is|are)\s+)?",
               re.IGNORECASE),
    re.compile(rf"^(?:this|it)\s+is\s+(?:an?\s+)?(?:\w+\s+)?{_SUBJECT.split('+', 1)[1]}\s+of\s+",
               re.IGNORECASE),
    re.compile(r"^(?:sure|certainly|of course)[!,.]?\s*(?:here\s+is\s+[^:]*:\s*)?", re.IGNORECASE),
    re.compile(r"^(?:assistant|answer|caption|description)\s*:\s*", re.IGNORECASE),
]
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|i (?:cannot|can't|can not|am unable|'m unable|won't)|"
    r"as an ai|i do not feel comfortable|i'm not able|i am not able|unfortunately,? i)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class CleaningConfig:
    max_tokens: int | None = 77  # the encoders' budget incl. start/end tokens; None: no cut
    strip_boilerplate: bool = True
    reject_repetitive: bool = True  # looping generations ("a cat a cat a cat ...")
    min_unique_word_ratio: float = 0.3  # below this (over >= 12 words) counts as looping


@dataclass
class CleanCaption:
    text: str | None  # None when rejected
    reason: str | None  # snake_case rejection class, None when accepted


def approximate_tokens(text: str) -> int:
    """CLIP-BPE-like count without a tokenizer: ~1.3 tokens per word plus start and end."""
    return math.ceil(len(text.split()) * 1.3) + 2


def clean_caption(
    raw: str | None, config: CleaningConfig, count_tokens: TokenCounter = approximate_tokens
) -> CleanCaption:
    """Clean one generated caption, or say why it is rejected."""
    text = " ".join((raw or "").split())
    if config.strip_boilerplate:
        text = strip_boilerplate(text)
    if not any(ch.isalnum() for ch in text):
        return CleanCaption(None, "empty_caption")
    if _REFUSAL.match(text):
        return CleanCaption(None, "refusal")
    if config.reject_repetitive and _is_repetitive(text, config.min_unique_word_ratio):
        return CleanCaption(None, "repetitive_caption")
    if config.max_tokens is not None:
        text = fit_budget(text, config.max_tokens, count_tokens)
    return CleanCaption(text, None)


def strip_boilerplate(text: str) -> str:
    """Remove opening phrases like "The image shows", repeatedly, and recapitalise."""
    changed = True
    while changed and text:
        changed = False
        for pattern in _BOILERPLATE:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.lstrip(" ,:;-"), True
    return text[:1].upper() + text[1:]


def fit_budget(text: str, max_tokens: int, count_tokens: TokenCounter) -> str:
    """The longest prefix of whole sentences (else of words) within `max_tokens`."""
    if count_tokens(text) <= max_tokens:
        return text
    kept = ""
    for sentence in _SENTENCE_END.split(text):
        candidate = f"{kept} {sentence}".strip()
        if count_tokens(candidate) > max_tokens:
            break
        kept = candidate
    if kept:
        return kept
    words = text.split()
    low, high = 0, len(words)  # binary search: the first sentence alone is too long
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle])) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def _is_repetitive(text: str, min_ratio: float) -> bool:
    words = re.findall(r"\w+", text.lower())
    return len(words) >= 12 and len(set(words)) / len(words) < min_ratio

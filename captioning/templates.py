"""Versioned captioning prompts: an id names one exact text forever, its hash proves which.

A prompt's wording changes the captions, so every caption records the prompt id and the
sha256 of the text it was generated with. Never edit a registered text: add a new id
(`detailed_v2`) instead; a test pins the hashes so an edit fails loudly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    text: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


# The default asks for what SD3's recaptioning gained most on: colours, positions, text.
DETAILED_V1 = PromptTemplate(
    "detailed_v1",
    "Describe this image in detail in one paragraph: the main subjects and what they are "
    "doing, the setting, the style or medium, the colours of each object, where objects are "
    "relative to each other (left, right, above, below, in front, behind), and any written "
    "text, quoted exactly. Start directly with the description.",
)
SHORT_V1 = PromptTemplate(
    "short_v1",
    "Describe this image in one sentence, naming the main subject, its colours and the setting.",
)

PROMPTS: dict[str, PromptTemplate] = {p.id: p for p in (DETAILED_V1, SHORT_V1)}


def resolve_prompt(prompt_id: str, custom_text: str | None = None) -> PromptTemplate:
    """The registered prompt `prompt_id`, or a custom text under a new (unregistered) id."""
    if custom_text is not None:
        if prompt_id in PROMPTS and PROMPTS[prompt_id].text != custom_text:
            raise ValueError(
                f"prompt_id {prompt_id!r} is a registered prompt with other text; give the "
                f"custom prompt a new id (registered ids: {sorted(PROMPTS)})"
            )
        return PromptTemplate(prompt_id, custom_text)
    if prompt_id not in PROMPTS:
        raise ValueError(f"unknown prompt_id {prompt_id!r}; registered ids: {sorted(PROMPTS)}")
    return PROMPTS[prompt_id]

"""The `shapes` world's caption vocabulary, importable without numpy or torch so the API can check prompts for the
`shapes` preset before a job is queued."""

from __future__ import annotations


PAD = "<pad>"
COLOUR_WORDS = ("red", "green", "blue")
BASE_SHAPE_WORDS = ("circle", "square", "triangle")
OBJECT_WORD = "object"  # random polygons, and the neutral word in in-context pretraining samples
TRIGGER = "[V]"  # the new concept's word: in the vocabulary, never in a pretraining caption
MAX_TOKENS = 8  # "a red circle on a blue background" is 7 words
# Every word a caption may use, in the order of the caption encoder's embedding rows.
VOCABULARY = (PAD, "a", "on", "background", *COLOUR_WORDS, *BASE_SHAPE_WORDS, OBJECT_WORD, TRIGGER)


def caption_problems(caption: str) -> list[str]:
    """Why `caption` cannot be encoded by the `shapes` caption encoder (empty when it can): words outside the
    vocabulary, or more than `MAX_TOKENS` words."""
    words = caption.split()
    problems = []
    unknown = [w for w in words if w not in VOCABULARY or w == PAD]
    if unknown:
        problems.append(f"words outside the world's vocabulary: {', '.join(dict.fromkeys(unknown))}")
    if len(words) > MAX_TOKENS:
        problems.append(f"longer than {MAX_TOKENS} words")
    return problems

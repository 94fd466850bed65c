"""The built-in prompts without the trigger that every evaluation renders, to see whether an adapter leaves the rest
of the model alone (prior drift). Ordinary, varied subjects: a street, still life, landscape, person."""

from __future__ import annotations


PRIOR_PROMPTS: tuple[str, ...] = (
    "a photo of a city street at dusk",
    "a bowl of fruit on a wooden table",
    "a mountain lake under a clear sky",
    "a portrait of an elderly man smiling",
)

# Fixed evaluation seeds, away from the sample seeds (0, 1) so the report's images are not the sample images; each
# is reproducible with the unchanged pipeline (`generator=torch.Generator().manual_seed(seed)`).
EVAL_SEEDS: tuple[int, ...] = (7001, 7002, 7003, 7004)


def prior_prompts_with(
    user_prompts: list[str] | tuple[str, ...] | None,
    trigger: str | None = None,
    built_in: tuple[str, ...] | None = None,
) -> list[str]:
    """The built-in prior prompts (`built_in`: a preset's own, for a model with a closed vocabulary; else
    `PRIOR_PROMPTS`) plus the user's, duplicates dropped; a user prompt naming the trigger is refused, since prior
    drift is measured on prompts that must not call up the concept."""
    extra = list(user_prompts or [])
    if trigger:
        named = [p for p in extra if trigger in p.split() or "[V]" in p]
        if named:
            raise ValueError(f"prior prompts must not name the concept ({trigger!r} or [V]): {named[0]!r}")
    out: list[str] = []
    for prompt in [*(PRIOR_PROMPTS if built_in is None else built_in), *extra]:
        if prompt.strip() and prompt not in out:
            out.append(prompt)
    return out

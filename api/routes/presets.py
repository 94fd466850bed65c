"""The model presets a job can use."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import PrincipalDep
from api.routes.web import example_image_urls
from api.schemas import PresetPublic
from dopsd.presets import PRESETS


router = APIRouter(prefix="/v1/presets", tags=["presets"])


@router.get("", response_model=list[PresetPublic])
def read_presets(_: PrincipalDep) -> list[PresetPublic]:
    """Every preset, with the training defaults it applies."""
    return [
        PresetPublic(
            name=p.name,
            family=p.family,
            description=p.description,
            device=p.device,
            min_image_side=p.min_image_side,
            defaults=p.defaults,
            example_images=example_image_urls(p.example_images),
        )
        for p in PRESETS.values()
    ]

"""The route table."""

from fastapi import APIRouter

from api.routes import files, generations, health, jobs, presets, previews, usage


api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(jobs.router)
api_router.include_router(previews.router)
api_router.include_router(generations.router)
api_router.include_router(presets.router)
api_router.include_router(files.router)
api_router.include_router(usage.router)

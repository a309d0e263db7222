"""ASGI entry point for production servers: ``uvicorn layertrack.service.main:app``."""

from .api import create_app

app = create_app()

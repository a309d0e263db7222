# One image for the API, the migrations and the GPU workers.
# torch comes from PyTorch's CUDA index (the project pins the release, 2.13.0; the CUDA
# build satisfies the same pin). Build: docker build -t layertrack .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install "torch==2.13.0" --index-url ${TORCH_INDEX}

COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY workers ./workers
COPY integrations ./integrations
COPY migrations ./migrations
RUN pip install ".[worker]"

RUN useradd --create-home --uid 1000 layertrack && mkdir -p /var/lib/layertrack \
    && chown layertrack /var/lib/layertrack
USER layertrack
EXPOSE 8321
CMD ["uvicorn", "layertrack.service.main:app", "--host", "0.0.0.0", "--port", "8321"]

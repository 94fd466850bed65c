# The API image: no torch, no CUDA. Dependency layer first, code after, so code changes rebuild in seconds.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
RUN mkdir -p dopsd dopsd_client api core worker \
    && touch dopsd/__init__.py dopsd_client/__init__.py api/__init__.py core/__init__.py worker/__init__.py \
    && pip install --no-cache-dir '.[service]' && pip uninstall -y dopsd
COPY dopsd dopsd
# The `dopsd` command loads every command its entry points name (`dopsd client` among them).
COPY dopsd_client dopsd_client
COPY api api
COPY core core
COPY worker worker
COPY migrations migrations
COPY alembic.ini ./
RUN pip install --no-cache-dir --no-deps '.[service]'
USER 1000:1000
EXPOSE 8000
CMD ["uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

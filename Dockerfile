# The broker_q image: one image for every broker_q process (relay, worker, run); the command picks one.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker_q ./broker_q
COPY projections ./projections
RUN pip install '.[postgres]'

# Processes do not need root; the store is PostgreSQL, so nothing is written inside the container.
RUN useradd --system --no-create-home --uid 10001 broker_q
USER broker_q

CMD ["broker-q", "--help"]

# The server image: the worker, the API with its refresher, and the CLI, for real Kafka and
# PostgreSQL (the embedded stack of `abflow up` is the `local` extra, not installed here).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY abflow abflow
COPY producers producers
COPY stream_jobs stream_jobs
COPY storage storage
COPY bandit_service bandit_service
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/abflow --create-home abflow
COPY abflow/examples /examples
USER abflow
ENTRYPOINT ["abflow"]
CMD ["--help"]

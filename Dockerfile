FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY abflow abflow
COPY producers producers
COPY stream_jobs stream_jobs
COPY storage storage
COPY bandit_service bandit_service
RUN pip install --no-cache-dir . && mkdir -p /var/lib/abflow
COPY abflow/examples /examples
ENTRYPOINT ["abflow"]
CMD ["--help"]

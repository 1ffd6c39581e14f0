# One image for both roles: `cvat-hooks serve` (the receiver) and `cvat-hooks worker`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CVAT_HOOKS_DATA_DIR=/data \
    CVAT_HOOKS_RULES=/app/rules.yaml \
    CVAT_HOOKS_LOG_FORMAT=json \
    TMPDIR=/data/tmp

# Our own venv: works on the official image and on Debian's python alike.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip

WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY requirements/run.lock ./requirements/run.lock
# The locked versions only (./dev lock upgrades them), so an upstream release cannot change the image.
RUN pip install --no-cache-dir -r requirements/run.lock
COPY pyproject.toml README.md ./
COPY core ./core
COPY receiver ./receiver
COPY workers ./workers
COPY operations ./operations
RUN pip install --no-cache-dir --no-deps . && pip check && rm -rf build *.egg-info
COPY rules.yaml ./
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

RUN useradd --system --uid 10001 --gid 0 --home-dir /data --shell /usr/sbin/nologin cvathooks \
    && mkdir -p /data && chown 10001:0 /data && chmod 0770 /data
USER 10001
VOLUME ["/data"]
EXPOSE 8000

# Role-aware: the receiver answers /healthz; a worker must have a fresh heartbeat in Redis.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["cvat-hooks", "healthcheck"]

ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

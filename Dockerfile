# The Uvian worker: takes BullMQ jobs and streams AI replies. It listens on no
# port unless METRICS_PORT is set. Configuration and secrets come from the
# environment at run time; nothing secret is baked into the image.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOG_FORMAT=json

RUN groupadd --system --gid 10001 uvian \
    && useradd --system --uid 10001 --gid uvian --no-create-home --shell /usr/sbin/nologin uvian

WORKDIR /app

# The locked dependencies alone first, so a change to the code reuses this layer.
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY uvian_worker ./uvian_worker
# The wheel carries supabase/migrations, so `uvian-worker migrate` works in the image.
COPY supabase ./supabase
RUN pip install --no-deps .

USER uvian:uvian

# Healthy while this container's worker keeps its heartbeat in Redis and takes
# jobs. The probe answers within a few seconds even when Redis does not.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["uvian-worker", "health", "--this-host"]

# SIGTERM starts a graceful shutdown of up to SHUTDOWN_GRACE_S (25 s): give the
# container longer than that to stop (`docker run --stop-timeout 30`).
STOPSIGNAL SIGTERM
CMD ["uvian-worker", "run"]

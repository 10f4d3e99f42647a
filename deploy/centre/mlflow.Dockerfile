# MLflow tracking server for the centre: PostgreSQL for runs and metrics, artifacts (final.pt) served through the
# server from a volume (`--serve-artifacts`), so the ServerApp needs only MLFLOW_TRACKING_URI=http://mlflow:5000.
# The version range matches pyproject.toml's mlflow pin, so client and server speak the same API.
FROM python:3.12-slim
RUN python -m pip install --no-cache-dir "mlflow>=3.1,<4" "psycopg2-binary>=2.9,<3" \
    && useradd --uid 49998 --create-home mlflow && mkdir -p /mlflow/artifacts && chown -R mlflow /mlflow
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]

# A small image for the MLflow tracking server (CPU only; the lorafleet image is a CUDA image).
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/lorafleet/mlflow-server:3.17.2 infra/docker
#   docker push ghcr.io/lorafleet/mlflow-server:3.17.2
# mlflow is pinned to the version in pyproject.toml: clients and server speak the same registry
# API. psycopg2 talks to PostgreSQL (backend store), boto3 to S3/MinIO (artefact store).
FROM python:3.11-slim

RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8 \
    && useradd --uid 1000 --create-home mlflow

USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]

-- Runs once, when the Postgres volume is first created: the image creates the `prefect`
-- database (POSTGRES_DB); MLflow's runs and model registry get their own.
CREATE DATABASE mlflow;

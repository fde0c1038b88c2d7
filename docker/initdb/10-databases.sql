-- One PostgreSQL server, a database per service (MLflow's is created by POSTGRES_DB).
CREATE DATABASE prefect;
CREATE DATABASE access;

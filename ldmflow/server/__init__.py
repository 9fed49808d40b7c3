"""Operations: the team's MLflow server on this machine (PostgreSQL and MLflow processes), for `ldmflow server`.

Apart from tracking/, which reads and writes runs and models through MLflow: this package starts and stops
processes and needs nothing of the ML code."""

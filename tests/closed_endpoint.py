"""A ModelScope endpoint nothing answers, for the tests that run offline (a module of its own:
`from conftest import ...` finds whichever conftest.py was imported first, tests/slurm's included)."""

CLOSED_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once

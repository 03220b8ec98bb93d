"""Integrations of memguard.client with ML libraries (optional extras).

Each module imports its library lazily, inside functions, so importing
``memguard.integrations.optuna`` costs nothing until it is used and works
where the library is not installed.
"""

"""Command-line interface: argument parsing only; each command calls one function below it."""

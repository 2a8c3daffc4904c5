"""The `llava` command line: Typer wiring only. Each command group lives in its own module."""

"""The `patchlm` command line: a typer app; each module here with a `register(app)` adds its commands."""

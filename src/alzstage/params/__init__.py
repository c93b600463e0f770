"""The params sections, one module per side of the pipeline; :mod:`alzstage.config` holds
the root model and the loaders, and is where callers import them from."""

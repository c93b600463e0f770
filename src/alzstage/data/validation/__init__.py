"""The ``validate`` stage's parts: image checks, rules, the GX adapter, decision, report.

``alzstage.data.validate`` is the stage itself (its I/O shell) and re-exports these
parts' public names. This ``__init__`` holds no code, so no stage depends on it.
"""

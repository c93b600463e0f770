"""The data sources of the ``download`` stage, one module per source.

Every source is one function ``collect_<source>(params, paths, staging)`` that fills
``staging`` (the future ``data/raw``) and returns the records of the images it wrote;
``alzstage.data.download.SOURCES`` maps each ``data.source`` value onto it. Shared
helpers: ``fetch`` (local paths and pinned URLs), ``extract`` (safe archive
extraction) and ``layout`` (class folders onto ``images/[split/]Class/``, skipped files).
"""

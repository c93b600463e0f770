"""``alzstage serve``: the REST API and web page (see :mod:`alzstage.serve.app`)."""

"""``ti serve``: the HTTP service (FastAPI), its job store, its worker (see :mod:`.app`)."""

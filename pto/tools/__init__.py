"""Operator and user tools: the ``pto`` command (``cli``: status, trace summarize, keygen)
and ``pto.status`` (``status``), a client of a broker's status request."""

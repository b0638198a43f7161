"""The layer every pto process shares, client, broker and workers alike: the wire format
(``protocol``), sockets, process plumbing (``procs``), shared memory (``shm``), completion
rings, group barriers, chip numbering, settings (``config``), CURVE keys (``security``),
errors, and the argument and dtype records. ``broker/`` and ``worker/`` import pto only
from here (and the worker's kernel runner, ``pto.chip.runner``); nothing here imports a
layer above it (tests/unit/test_layers.py).
"""

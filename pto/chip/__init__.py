"""L2 and compiled code: ``pto.Runtime(level="chip")`` (``runtime``), ``pto.compile``
(``compiler``, ``compile_inputs``, ``prebuilt``, ``elf``), what a registered package means
(``package``), the simulated chip (``simlib``, ``simtasks``, ``sim/``, ``include/``), and the
worker's side of a compiled kernel (``runner``: the one module of this package a worker
imports).
"""

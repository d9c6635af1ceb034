"""Readers of what XLA's TPU compiler writes, for `benchmarks.tpu_compile`: plain text in,
figures out; no JAX, no compiler (tests/test_tpu_parsers.py runs them on hand-written
dumps).

  shapes       bytes of an HLO shape ('bf16[8,16]{1,0}', tuples)
  collectives  the collectives of a compiled module's HLO text and the bytes they move
  memory       the largest buffers, what is live at the memory peak (XLA's dumps), and
               the figures of the compiler's out-of-memory refusal
  roofline     published chip figures and the roofline projection of a step's time
"""

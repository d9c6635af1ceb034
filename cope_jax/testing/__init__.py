"""PyTorch references and parity helpers, for tests and benchmarks.

`torch_reference`: an independent PyTorch reference of the released COPE model and of
the release's optimiser set-up. `parity`: helpers that run it beside the Flax model.
Everything here needs PyTorch; the library itself never imports this package, so PyTorch
stays an optional dependency.
"""

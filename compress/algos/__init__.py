"""Pure algorithms on tensors and modules: no I/O, no recipe types."""

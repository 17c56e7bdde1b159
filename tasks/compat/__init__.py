"""Every private API portq relies on, one module per library, each with `check()`: what a Python, torch or
onnxruntime upgrade could change under portq is here and nowhere else, and `tests/tasks/compat/` fails loudly,
naming what changed, when it does."""

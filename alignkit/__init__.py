"""alignkit: config-driven alignment of language models (SFT, preference optimisation, RL from feedback).

The package is organised by concern (see docs/DESIGN.md): ``config`` composes and validates,
``data`` turns files into one canonical record and one batch format, ``losses`` is a registry of pure
functions, ``models`` loads models and computes log-probs, ``engine`` wraps DeepSpeed, ``trainers``
hold one readable loop per runner, ``rewards`` holds rule-based reward functions and the demo judge.
"""

__version__ = "0.1.0"

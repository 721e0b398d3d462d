"""mmgrow-example: a template third-party mmgrow plugin package.

It registers one sequence mixer through the ``mmgrow.mixers`` entry-point group (see
``pyproject.toml``); mmgrow imports :mod:`mmgrow_example.short_conv` only when the mixer is used.
"""

__version__ = "0.1.0"

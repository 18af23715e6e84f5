"""The Hydra mains (train, eval, predict, explain) and their shared set-up (:mod:`.common`).

Nothing in the package imports these modules; the repository's ``train.py``, ``eval.py``,
``predict.py`` and ``explain.py`` are thin shims that call their ``main``.
"""

"""The Hydra mains (train, eval, predict, explain) and their shared set-up (:mod:`.common`).

Nothing in the package imports these modules; the repository's ``train.py``, ``eval.py``,
``predict.py`` and ``explain.py`` are thin shims: each runs its task through
:func:`changecam.cli.launch.hydra_main`, which checks the config before importing the task.
"""

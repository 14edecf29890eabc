"""The command line's parts: options generated from their one home (``options``) and the translation of the
options given into the typed config (``configs``). The commands themselves are in ``mvptr_ds/run.py``."""

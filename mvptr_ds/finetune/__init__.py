"""Downstream tasks on the pre-training engine: retrieval, VQA, SNLI-VE, referring expressions.

``runner.finetune(cfg)`` trains with the pre-training loop and evaluates with the task's metric; ``tasks``
holds the module and losses, ``heads`` the task heads, ``data``/``readers``/``synthetic`` the datasets,
``metrics`` the metrics. Nothing is imported here (the package stays cheap to import).
"""

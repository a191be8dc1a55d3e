"""How work is done on a node: the stateful workers that hold a model (scorers, embedders, engines, trainers).

Nothing here imports from ``pipelines`` or ``cluster``.
"""

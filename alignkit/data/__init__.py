"""alignkit.data: the shared data pipeline.

Files -> raw rows (``sources``) -> canonical ``Record`` (``formats``, ``record``) -> the loss's view
(``views`` over ``convert``) -> ``TokenizedGroup`` (``tokenize``) -> ``Batch`` (``collate``, the
contract in ``batch``). ``pipeline.prepare_data`` runs it all (with caching); the
trainers batch the groups; ``doctor`` + ``cli`` are ``alignkit data ...``.
Settings: ``config.DataConfig``. Nothing is imported here, so ``import alignkit.data.batch`` stays light.
"""

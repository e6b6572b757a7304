"""The learning log's wing: everything that reads or writes the log in Postgres.

- :mod:`~service.log.transaction`: the log's lock, reading it, the one append transaction
  that deciding and learning share (:class:`~service.log.transaction.LearningLog`), and
  restoring the live policy;
- :mod:`~service.log.decisions`: a decided batch's writes (decisions, failure rewards, the
  early labels taken);
- :mod:`~service.log.join` (pure) and :mod:`~service.log.labels`: joining labels to their
  decisions, and the SQL that applies the join's plan;
- :mod:`~service.log.follower`: following other instances' appends (LISTEN/NOTIFY, polls);
- :mod:`~service.log.checkpoints` and :mod:`~service.log.session`: the one checkpoint writer,
  and the instance's name;
- :mod:`~service.log.rows`: the typed rows the core reads;
- :mod:`~service.log.read_models`: what people and the metrics read.

The tables themselves are declared in :mod:`service.storage`.
"""

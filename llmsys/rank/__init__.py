"""The human in RLHF: people rank sampled responses in a web page; the rankings train the reward model.

``python -m llmsys.rank sample`` draws K responses per prompt from an export into a candidates file
(:mod:`~llmsys.rank.candidates`); ``serve`` shows them to annotators and appends each submission to a
rankings file that ``stage=reward data=files data.path=rankings.jsonl`` reads unchanged
(:mod:`~llmsys.rank.store`, :mod:`~llmsys.rank.app`, the page in ``static/``), and with ``--compare``
also shows the pipeline's stages side by side (:mod:`~llmsys.rank.compare`); ``stats`` counts the
rankings and measures how far annotators agree (:mod:`~llmsys.rank.stats`).
"""

"""``make demo`` / ``atkd-demo`` / ``python -m atkd.student.demo``: a tiny student distilled from a tiny teacher.

- :mod:`.cli`: the demo (``main``): train students with ATKD and SFT, print held-out perplexity and accuracy;
  ``--prepare-only DIR`` writes the models and text a deployment starts from.
- :mod:`.assets`: the corpus, tokenizer, pre-trained teacher and student initialisation, built once and cached.
- :mod:`.teacher_process`: a teacher server (``atkd-teacher serve``) as a child process on loopback; also the
  launcher of the tests and benchmarks.
"""

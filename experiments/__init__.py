"""The paper's two claims checked at small scale through the distributed system (``python -m experiments``).

:mod:`.data` builds the two tasks from real text, :mod:`.models` the tokenizer, teachers and student,
:mod:`.grid` the runs, :mod:`.sweep` runs them (resumably) against teacher servers, :mod:`.run_one` is one
run's process, and :mod:`.report` writes docs/results.md.
"""

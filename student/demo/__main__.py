"""``python -m atkd.student.demo``: see :mod:`atkd.student.demo.cli`."""

from .cli import main

main()

"""``python -m softxent``: the ``softxent`` command line."""

from softxent.cli import main

raise SystemExit(main())

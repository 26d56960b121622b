"""``python -m apr_cli`` is the ``apr`` command."""

from .cli import main

raise SystemExit(main())

"""``python -m audit``: see audit/cli.py."""

from audit.cli import main

main()

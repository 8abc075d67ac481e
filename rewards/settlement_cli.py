"""Click commands for the chain side of rewards (deploy, post, claim, chain node).

Owned by the settlement work; ``rewards/cli.py`` adds every command in ``COMMANDS`` to its group.
"""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

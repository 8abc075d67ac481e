"""``python -m rewards``."""

from rewards.cli import main

main()

"""``python -m lever_trainer`` runs the ``lever-train`` command line."""

from .cli import main

main()

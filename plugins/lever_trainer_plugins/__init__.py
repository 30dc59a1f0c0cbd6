"""Built-in plugins of lever_trainer.

Each module here is a plugin, registered through the ``lever_trainer`` entry-point
group in ``pyproject.toml`` exactly as a third-party package would register one; the
core never imports this package.
"""

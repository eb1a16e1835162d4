"""The top floor: the ``lifelong`` command (``main``), its sub-commands, the local stack and the
Flower deployment launcher. Nothing in the house imports this package."""

"""The `fabricd` command: the top of the layers (it may use the control client, the
daemon and the tools; nothing imports it)."""

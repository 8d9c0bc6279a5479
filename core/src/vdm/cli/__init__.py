"""The ``vdm`` command: global options, plugin loading, subcommands from plugins."""

"""fabricd configuration: validate YAML files and API dicts into frozen specs.

Everything the daemon acts on passes through here, so a bad value anywhere stops with one
line naming the source, the key path and the problem (``ConfigError``).

- ``specs``: the frozen specs and defaults (no project or YAML imports; the cores use it)
- ``fields``: primitive readers (ints, addresses, durations, sizes, names)
- ``parse``: namespace/pod/service/worker/tunnel parsers and the checks across namespaces
- ``load``: the YAML loader (duplicate keys rejected) and the embedded default
- ``render``: specs back to plain data

Nothing is imported here, so importing a spec never pulls in PyYAML or the parsers.
"""

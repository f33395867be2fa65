"""The activators shipped with fabricd: sources and built .wasm, one folder each
(``<name>/<name>.wasm``), found at run time with importlib.resources so they ship in the
wheel too. ``ABI.md`` is the binary interface they implement."""

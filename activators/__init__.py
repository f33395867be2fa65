"""The activators shipped with fabricd: sources and built .wasm, one folder each
(``<name>/<name>.wasm``), found at run time with importlib.resources. The wheel carries
only the shipped .wasm files (not the sources, ``testing/`` or ``ABI.md``, the binary
interface they implement), so an installed fabricd needs no source tree."""

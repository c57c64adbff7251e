"""effx.core: the contracts every layer reads, and nothing else of effx.

spec (the run spec, its TOML and CLI flags), registry (attention kinds and cache layouts), manifest (the
artifact folders' manifest.json), protocol (the host side of a decoder's cache plan), runner (the runner
interface), tolerance, errors, atomic output folders, lazy imports of optional dependencies.
"""

"""The layering benchmark: how many bytes each layering strategy makes clients download.

Run it with ``benchmarks/layering`` (see ``benchmarks/README.md``). The modules,
in the order the benchmark uses them: :mod:`.corpus` (closure graphs from
Debian's package metadata or from real Nix builds), :mod:`.workload` (image
requests shaped like Nixery's traffic), :mod:`.strategies` (the strategies
compared), :mod:`.metrics` (pull and storage ratios), :mod:`.run` (the table).
"""

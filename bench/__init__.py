"""The kaireon-pub bench: the tier's throughput, latency and footprint against ceilings measured
in the same run (see bench/README.md and ../shared/LIMITS.md)."""

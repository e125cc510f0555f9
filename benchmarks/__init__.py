"""Load and quality benchmarks for bundlerec (own entry points: ``python -m benchmarks.<tool>``)."""

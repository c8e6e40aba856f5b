"""Testing utilities, not part of the model: random weights and generated thin-structure data for
tests, benchmarks and dry runs. Nothing in the refine or train path imports this package."""

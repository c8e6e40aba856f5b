"""Testing utilities, not part of the model: seeded random weights (`randomize_`, which lives in
hqsam_core.random_weights beside `build_hqsam(variant, "random")`) and generated thin-structure data
for tests and benchmarks. Nothing in the refine or train path imports this package."""

"""The framework-free core: options, the eps placements, the ladder and its driver,
double-word pairs, the lowering registry, the reference's oracle and the portable formula."""

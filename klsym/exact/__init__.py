"""Exact: the reference numbers. Distribution families, exact expectations and gradients (closed forms,
exact categorical sums, log-space quadrature), clamps and floating-point precision."""

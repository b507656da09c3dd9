"""The compiler wing, in data order: `config` (the options, validated; their values in `options`)
-> `backend` (capture -> `passes/` -> AOTAutograd -> eager or Inductor) -> `ops/` (every
fairy2i:: op) -> `codegen/` (what kernel="..." means, and the kernels); `dump`, `report` and
`mlir_export` show what it did.

Import nothing here: the quantizer imports `compiler.options`, and a package import with side
effects would tie every wing to the backend.
"""

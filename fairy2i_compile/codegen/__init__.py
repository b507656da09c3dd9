"""Lowering of the packed fairy2i op to generated kernels (Triton on GPU).

Empty until the packed-weights work lands: the backend currently runs the
rewritten graphs through AOTAutograd with the eager runner or Inductor, and
`kernel="triton"` raises NotImplementedError (see `Fairy2iConfig.check_implemented`).
"""

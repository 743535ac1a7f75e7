"""Second-order products of the objective: the one Hessian-product primitive and :class:`HessianOperator`
(:mod:`.operator`), the declared product strategy (:mod:`.base`: exact double backward, finite differences in
:mod:`.finite_difference`), the curvature-operator protocol (:mod:`.linop`), the chunk policy (:mod:`.autotune`),
FSDP-sharded products (:mod:`.fsdp`) and the float64 audit of approximate products (:mod:`.audit`)."""

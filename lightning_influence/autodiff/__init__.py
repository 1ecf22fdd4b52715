"""The loss as a function of flat θ: Hessian-vector products, per-sample terms, tracked parameters, query
gradients. No Lightning."""

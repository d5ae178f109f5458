"""Parameter porting between frameworks and peer conventions (:mod:`l2norm.convert` is the
public face)."""
